"""Config folding for ``pgolf bundle``: the bundled sources partially evaluated for the one
configuration the file is built for.

A bundle runs one resolved configuration. Every setting that cannot change at run time is a
known constant when the bundle is generated, so a read of it (``cfg.model.num_loops``,
``self.cfg.quant.qat``, ``cfg.eval_seq_len`` when both of its inputs are fixed) can be replaced
by its value, ``if``/``while``/``assert``/ternaries on constants folded, and whatever the folded
branches alone reached (functions, classes, imports, whole modules) dropped by the shake that
follows. :func:`fold_sources` iterates fold and shake to a fixed point.

What stays live (never folded):

* the settings the bundled script reads from the environment (:func:`pgolf.submit.bundle.live_settings`): every
  challenge variable of :data:`pgolf.config.envvars.CHALLENGE_ENV` (``SEED``, ``DATA_PATH``,
  ``MAX_WALLCLOCK_SECONDS``, ...), the settings the verification run shrinks through
  ``PGOLF_*`` variables (:func:`pgolf.submit.seeds.probe_overrides`: device, compile, width, ...)
  and those ``pgolf audit``'s causality check sets on the bundle's own code. A ``PGOLF_*``
  variable naming any other setting is an error in the bundled script (``envvars.LIVE``), never
  silently ignored;
* every field that bundled code assigns (``x.field = ...``, ``setattr(x, "field", ...)``,
  ``replace(x, field=...)``) on anything that may be a config object.

How values are known (all static, on the AST): a name annotated with a config class
(``cfg: RunConfig``, ``mc: ModelConfig | None``), ``self`` in a config class's methods, a local
every assignment of which is a config object of one class (``t = self.cfg.train``), an instance
attribute every assignment of which, in its class, is one (``self.cfg = cfg``), ``.model`` etc.
of a RunConfig; properties and argument-free (or constant-argument) methods of config classes
when their bodies only read fixed fields and call pure builtins. Beyond config reads: a local
assigned exactly once, at the top of its function body, to a constant; an instance attribute
assigned exactly once in the whole bundle, at the top of its class's ``__init__``, to a
constant (``self.sharded = True``), with no class attribute, ``setattr`` or other assignment of
that name anywhere.

Also: ``typing.TYPE_CHECKING`` is False, modules' ``__all__`` lists go when nothing star-imports,
and a function-level import of a pgolf or standard-library module whose names nothing reads any
more goes (then a module no kept code imports leaves the bundle).

The config dataclasses keep every field (``to_dict`` of the run's config, written to
``config.json`` and into the artifact, is unchanged); only code shrinks.

What the fold relies on (true of pgolf's code, and checked by the verification run of every
bundle and by tests/test_submit_fold.py, which runs a folded and an unfolded bundle side by side):
annotations name the class a value has at run time; config objects other than the run's own
(the artifact's model config, ``export_config``) differ from it only in assigned fields; the
stores of :mod:`pgolf.config` (building a config: ``from_dict``, profile scaling) happen before a
run reads its configuration; no code sets another object's attribute through a computed name
(``setattr(obj, name, v)``) to replace a constant that the fold read; values compared at bundle
time are the validated settings.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import inspect
import math
import textwrap
from typing import Any

from pgolf.config import SECTIONS, RunConfig

#: Settings ``pgolf audit``'s causality check sets on a bundle's own code (pgolf.submit.audit).
AUDIT_SETTINGS = ("ttt.batch_docs", "ttt.prefix_docs", "ttt.phases", "ttt.doc_chunk", "ttt.seq_len", "ttt.chunk_tokens")
#: The module and name of the bundled script's table of settings it reads from the environment.
LIVE_TABLE = ("pgolf.config.envvars", "LIVE")

_NO = object()  # "not known at bundle time"
_PURE_BUILTINS = frozenset({"len", "min", "max", "abs", "int", "float", "bool", "round", "sorted", "tuple", "list", "set",
                            "frozenset", "any", "all", "sum", "str", "range", "divmod", "isinstance", "reversed"})
_MUTATORS = frozenset({"append", "extend", "insert", "remove", "pop", "clear", "sort", "reverse", "update", "add", "discard",
                       "setdefault", "popitem"})
_SCOPE_BREAKERS = frozenset({"locals", "vars", "eval", "exec", "globals"})


# ------------------------------------------------------------------------------------------------
# values


def emittable(v: Any) -> bool:
    """A value a literal reproduces exactly (an immutable scalar, or a tuple of them)."""
    t = type(v)
    if t is float:
        return math.isfinite(v)
    if t is str or t is bytes:
        return len(v) <= 200
    if t in (bool, int, type(None)):
        return True
    return t is tuple and len(v) <= 16 and all(emittable(x) for x in v)


def literal(v: Any) -> ast.expr:
    if type(v) is tuple:
        return ast.Tuple([literal(x) for x in v], ast.Load())
    if type(v) in (int, float) and (v < 0 or (v == 0 and math.copysign(1, v) < 0)):
        return ast.UnaryOp(ast.USub(), ast.Constant(-v))
    return ast.Constant(v)


class ConfigModel:
    """The resolved config objects by class name, what is live, and which members are pure."""

    def __init__(self, cfg: RunConfig, live: set[str]):
        self.cfg = cfg
        self.live = set(live)
        self.objects: dict[str, tuple[Any, str]] = {type(cfg).__name__: (cfg, "")}
        for s in SECTIONS:
            obj = getattr(cfg, s)
            self.objects[type(obj).__name__] = (obj, s + ".")
        self.stored: set[str] = set()  # field names some bundled code assigns
        self._pure: dict[tuple[type, str], bool] = {}

    def field_known(self, ref: tuple[Any, str], name: str) -> bool:
        obj, prefix = ref
        names = {f.name for f in dataclasses.fields(obj)}
        if name not in names:
            return False
        return (prefix + name) not in self.live and name not in self.stored

    def member_pure(self, cls: type, name: str) -> bool:
        """A property or method whose body reads only fixed fields and constants and calls only
        pure builtins and other such members (so calling it at bundle time gives its run-time value)."""
        key = (cls, name)
        if key in self._pure:
            return self._pure[key]
        self._pure[key] = False  # recursion guard
        member = inspect.getattr_static(cls, name, None)
        fn = member.fget if isinstance(member, property) else member
        if not inspect.isfunction(fn):
            return False
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        except (OSError, TypeError, SyntaxError):
            return False
        fdef = tree.body[0]
        if not isinstance(fdef, ast.FunctionDef) or not fdef.args.args:
            return False
        ref = next((r for r in self.objects.values() if type(r[0]) is cls), None)
        if ref is None:
            return False
        self_name = fdef.args.args[0].arg
        local = {a.arg for a in fdef.args.args + fdef.args.kwonlyargs}
        for n in ast.walk(fdef):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                local.add(n.id)
        module = inspect.getmodule(fn)
        ok = True
        for n in ast.walk(fdef):
            if n is fdef:
                continue
            if isinstance(n, (ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal, ast.Yield, ast.YieldFrom, ast.Await,
                              ast.Delete, ast.Lambda, ast.FunctionDef, ast.ClassDef, ast.Try, ast.With, ast.Raise)):
                ok = False
            elif isinstance(n, ast.Attribute):
                if not (isinstance(n.value, ast.Name) and n.value.id == self_name and isinstance(n.ctx, ast.Load)):
                    ok = False
                elif not (self.field_known(ref, n.attr) or self.member_pure(cls, n.attr)):
                    ok = False
            elif isinstance(n, ast.Call):
                f = n.func
                if not ((isinstance(f, ast.Name) and f.id in _PURE_BUILTINS and f.id not in local)
                        or (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == self_name)):
                    ok = False
            elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in local and n.id != self_name:
                if n.id in _PURE_BUILTINS or n.id in ("True", "False", "None"):
                    continue
                value = getattr(module, n.id, _NO)
                if not emittable(value):  # module-level constants only
                    ok = False
            if not ok:
                break
        self._pure[key] = ok
        return ok


# ------------------------------------------------------------------------------------------------
# facts about the whole bundle (collected in one pass, used in the next)


@dataclasses.dataclass
class Facts:
    attr_types: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)  # (class key, attr) -> config class
    attr_consts: dict[tuple[str, str], Any] = dataclasses.field(default_factory=dict)  # (class key, attr) -> value
    classes: dict[str, str] = dataclasses.field(default_factory=dict)  # class name (unique in the bundle) -> "obj:<class key>"


class Collector:
    """What one fold pass sees: assignments to attributes, class-level names, class bases."""

    def __init__(self):
        self.self_stores: dict[str, list[tuple[str, str | None, Any, bool]]] = {}  # attr -> [(class key, type, value, init_top)]
        self.dirty: set[str] = set()  # attrs assigned other than as self.attr = ... (or by a literal setattr)
        self.class_names: set[str] = set()  # names defined in some class body
        self.bases: dict[str, set[str]] = {}  # class key -> base names
        self.opaque_classes: set[str] = set()  # classes whose methods do that to their own instance

    def facts(self) -> Facts:
        out = Facts()
        by_name: dict[str, set[str]] = {}
        for key in self.bases:
            by_name.setdefault(key.split(":")[1], set()).add(key)
        out.classes = {name: "obj:" + keys.pop() for name, keys in by_name.items() if len(keys) == 1}

        def subclasses(key: str) -> set[str]:
            seen, todo = set(), [key.split(":")[1]]
            while todo:
                n = todo.pop()
                for k, bases in self.bases.items():
                    if n in bases and k not in seen:
                        seen.add(k)
                        todo.append(k.split(":")[1])
            return seen

        def superclasses(key: str) -> set[str]:
            seen, todo = set(), list(self.bases.get(key, ()))
            while todo:
                for k in by_name.get(todo.pop(), ()):
                    if k not in seen:
                        seen.add(k)
                        todo += sorted(self.bases.get(k, ()))
            return seen

        for attr, stores in self.self_stores.items():
            if attr in self.dirty or attr in self.class_names:
                continue
            classes = {s[0] for s in stores}
            for key in classes:
                mine = [s for s in stores if s[0] == key]
                related = subclasses(key) | superclasses(key)
                if key in self.opaque_classes or related & self.opaque_classes or any(s[0] in related for s in stores):
                    continue
                types = {s[1] for s in mine}
                if len(types) == 1 and None not in types:
                    out.attr_types[(key, attr)] = types.pop()
                if len(stores) == 1 and mine[0][3] and mine[0][2] is not _NO:
                    out.attr_consts[(key, attr)] = mine[0][2]
        return out


# ------------------------------------------------------------------------------------------------
# the fold


class Scope:
    """A function (or lambda/comprehension) scope: locals, their config types and constants."""

    def __init__(self, parent: Scope | None, names: set[str], types: dict[str, str], self_name: str | None = None,
                 class_key: str | None = None, config_class: str | None = None):
        self.parent, self.names, self.types = parent, names, types
        self.consts: dict[str, Any] = {}
        self.single: set[str] = set()  # locals stored once, at the top of the body
        self.self_name, self.class_key, self.config_class = self_name, class_key, config_class
        self.opaque = False  # locals()/eval(): no constant propagation
        self.function = ""

    def lookup(self, name: str) -> Scope | None:
        s = self
        while s is not None:
            if name in s.names:
                return s
            s = s.parent
        return None


def _annotation_class(ann: ast.expr | None, classes: dict) -> str | None:
    if ann is None:
        return None
    if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
        try:
            ann = ast.parse(ann.value, mode="eval").body
        except SyntaxError:
            return None
    if isinstance(ann, ast.BinOp) and isinstance(ann.op, ast.BitOr):
        found = {_annotation_class(ann.left, classes), _annotation_class(ann.right, classes)} - {None}
        return found.pop() if len(found) == 1 else None
    if isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name) and ann.value.id == "Optional":
        return _annotation_class(ann.slice, classes)
    if isinstance(ann, ast.Name) and ann.id in classes:
        return classes[ann.id]
    if isinstance(ann, ast.Attribute) and ann.attr in classes:
        return classes[ann.attr]
    return None


def _stores(body: list[ast.stmt], args: ast.arguments | None):
    """Bindings of a function scope: (name -> count, names bound once by an assignment at the top
    of ``body``, opaque (locals()/eval()), name -> [value assigned, or None when not a plain value])."""
    counts: dict[str, int] = {}
    binds: dict[str, list[ast.expr | None]] = {}
    opaque = False

    def add(name: str, value: ast.expr | None = None, n: int = 1) -> None:
        counts[name] = counts.get(name, 0) + n
        binds.setdefault(name, []).append(value)

    if args is not None:
        for a in args.posonlyargs + args.args + args.kwonlyargs:
            counts[a.arg] = counts.get(a.arg, 0) + 1  # typed by its annotation, not a bind site
        for a in (args.vararg, args.kwarg):
            if a:
                add(a.arg)

    def assign(target: ast.expr, value: ast.expr | None) -> None:
        if isinstance(target, ast.Name):
            add(target.id, value)
        elif isinstance(target, (ast.Tuple, ast.List)):
            vals = value.elts if isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(target.elts) else None
            for i, e in enumerate(target.elts):
                assign(e, vals[i] if vals else None)
        elif isinstance(target, ast.Starred):
            assign(target.value, None)

    def target_loads(t: ast.expr) -> None:  # the reads inside an assignment target (x[i] = ...)
        if isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                target_loads(e)
        elif isinstance(t, ast.Starred):
            target_loads(t.value)
        elif not isinstance(t, ast.Name):
            walk(t)

    def walk(node: ast.AST) -> None:
        nonlocal opaque
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                add(child.name)
                for n in ast.walk(child):  # a nested scope's nonlocal/global rebinds names here
                    if isinstance(n, (ast.Nonlocal, ast.Global)):
                        for name in n.names:
                            add(name, None, 2)
                    elif isinstance(n, ast.Name) and n.id in _SCOPE_BREAKERS:
                        opaque = True
                if not isinstance(child, ast.ClassDef):
                    for d in child.decorator_list + child.args.defaults + [d for d in child.args.kw_defaults if d]:
                        walk(d)
                continue
            if isinstance(child, ast.Assign):
                for t in child.targets:
                    assign(t, child.value)
                    target_loads(t)
                walk(child.value)
                continue
            if isinstance(child, ast.Name):
                if isinstance(child.ctx, (ast.Store, ast.Del)):
                    add(child.id)
                elif child.id in _SCOPE_BREAKERS:
                    opaque = True
            elif isinstance(child, ast.NamedExpr):
                add(child.target.id, child.value)
                walk(child.value)
                continue
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                for a in child.names:
                    add((a.asname or a.name).split(".")[0])
            elif isinstance(child, ast.ExceptHandler) and child.name:
                add(child.name, None, 2)
            elif isinstance(child, (ast.Global, ast.Nonlocal)):
                for name in child.names:
                    add(name, None, 2)
            elif isinstance(child, (ast.AugAssign, ast.AnnAssign)) and isinstance(child.target, ast.Name):
                add(child.target.id, None, 2)  # an augmented assignment reads and binds: never a constant
                if child.value is not None:
                    walk(child.value)
                continue
            walk(child)

    for st in body:
        walk(ast.Module([st], []))
    top_once = {st.targets[0].id for st in body
                if isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name)}
    single = {n for n in top_once if counts.get(n) == 1}
    return counts, single, opaque, binds


def _setattr_call(n: ast.AST) -> bool:
    f = getattr(n, "func", None)
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
    return isinstance(n, ast.Call) and len(n.args) >= 2 and name in ("setattr", "delattr", "__setattr__", "__delattr__")


def _sets_own_attrs(method: ast.AST, self_name: str) -> bool:
    """``setattr(self, name, ...)`` with a computed name, ``self.__dict__`` or ``vars(self)``."""
    for n in ast.walk(method):
        if _setattr_call(n) and isinstance(n.args[0], ast.Name) and n.args[0].id == self_name and not isinstance(n.args[1], ast.Constant):
            return True
        if isinstance(n, ast.Attribute) and n.attr == "__dict__" and isinstance(n.value, ast.Name) and n.value.id == self_name:
            return True
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "vars" and n.args
                and isinstance(n.args[0], ast.Name) and n.args[0].id == self_name):
            return True
    return False


def _is_literal(node: ast.expr) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    if isinstance(node, ast.Tuple):
        return all(_is_literal(e) for e in node.elts)
    return isinstance(node, ast.Constant)


def _droppable_import(module: str) -> bool:
    """Function-level imports that may go when nothing reads their names: pgolf's own modules (the
    bundle's shake already drops its unused module-level ones) and the standard library."""
    import sys

    top = module.split(".")[0]
    return top == "pgolf" or top in sys.stdlib_module_names


class Folder:
    """One fold pass over one module, using ``facts`` from the previous pass and recording new ones."""

    def __init__(self, model: ConfigModel, facts: Facts, collector: Collector, module: str):
        self.model, self.facts, self.col, self.module = model, facts, collector, module
        self.changed = 0

    # ---- types and values

    def typ(self, node: ast.expr, scope: Scope | None) -> str | None:
        """The config class name of an expression that is one of the resolved config objects."""
        if isinstance(node, ast.Name):
            s = scope.lookup(node.id) if scope else None
            return s.types.get(node.id) if s else None
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            base = self.typ(node.value, scope)
            if base and base.startswith("obj:"):
                return self.facts.attr_types.get((base[4:], node.attr))
            obj = self.model.objects[base][0] if base else None
            if obj is not None and self.model.objects[base][1] == "" and node.attr in SECTIONS:
                return type(getattr(obj, node.attr)).__name__
        return None

    def _self_attr(self, node: ast.Attribute, scope: Scope | None) -> bool:
        """``self.attr`` in a method of a class that is not a config class."""
        return (scope is not None and scope.class_key is not None and not scope.config_class and isinstance(node.value, ast.Name)
                and node.value.id == scope.self_name and scope.lookup(node.value.id) is scope)

    def ev(self, node: ast.expr, scope: Scope | None) -> Any:
        try:
            return self._ev(node, scope)
        except Exception:  # noqa: BLE001 - anything that would raise is left to run time
            return _NO

    def _ev(self, node: ast.expr, scope: Scope | None) -> Any:
        m = self.model
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            s = scope.lookup(node.id) if scope else None
            if s is not None and node.id in s.consts:
                return s.consts[node.id]
            if s is None and node.id == "TYPE_CHECKING" and self.type_checking:
                return False  # typing.TYPE_CHECKING: False at run time
            return _NO
        if isinstance(node, ast.Attribute):
            if not isinstance(node.ctx, ast.Load):
                return _NO
            base = self.typ(node.value, scope)
            if base and base.startswith("obj:"):
                return self.facts.attr_consts.get((base[4:], node.attr), _NO)
            return _NO if base is None else self._member(base, node.attr)
        if isinstance(node, ast.Call):
            if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                return _NO
            f = node.func
            if isinstance(f, ast.Name) and f.id == "getattr" and len(node.args) in (2, 3) and not node.keywords:
                base = self.typ(node.args[0], scope)
                name = self.ev(node.args[1], scope)
                if base and not base.startswith("obj:") and isinstance(name, str):
                    v = self._member(base, name)
                    if v is not _NO or len(node.args) == 2:
                        return v
                    obj = m.objects[base][0]
                    if not hasattr(obj, name):  # the default: a name the config class never has
                        return self.ev(node.args[2], scope)
                return _NO
            args = [self.ev(a, scope) for a in node.args]
            kwargs = {k.arg: self.ev(k.value, scope) for k in node.keywords}
            if any(a is _NO for a in args) or any(v is _NO for v in kwargs.values()):
                return _NO
            if isinstance(f, ast.Name) and f.id in _PURE_BUILTINS and (scope is None or scope.lookup(f.id) is None):
                if f.id in ("range", "reversed"):
                    return _NO
                return getattr(builtins, f.id)(*args, **kwargs)
            if isinstance(f, ast.Attribute):
                base = self.typ(f.value, scope)
                if base and not base.startswith("obj:"):
                    return self._member(base, f.attr, (args, kwargs))
            return _NO
        if isinstance(node, ast.BoolOp):
            is_and = isinstance(node.op, ast.And)
            v = _NO
            for operand in node.values:
                v = self.ev(operand, scope)
                if v is _NO:
                    return _NO
                if bool(v) != is_and:
                    return v
            return v
        if isinstance(node, ast.UnaryOp):
            v = self.ev(node.operand, scope)
            if v is _NO:
                return _NO
            return {ast.Not: lambda x: not x, ast.USub: lambda x: -x, ast.UAdd: lambda x: +x, ast.Invert: lambda x: ~x}[type(node.op)](v)
        if isinstance(node, ast.Compare):
            left = self.ev(node.left, scope)
            if left is _NO:
                return _NO
            for op, right_node in zip(node.ops, node.comparators):
                right = self.ev(right_node, scope)
                if right is _NO:
                    return _NO
                if isinstance(op, (ast.Is, ast.IsNot)):
                    if not any(x is None or x is True or x is False for x in (left, right)):
                        return _NO
                ok = _COMPARE[type(op)](left, right)
                if not ok:
                    return False
                left = right
            return True
        if isinstance(node, ast.BinOp):
            a, b = self.ev(node.left, scope), self.ev(node.right, scope)
            if a is _NO or b is _NO or isinstance(node.op, ast.Pow) and isinstance(b, int) and abs(b) > 64:
                return _NO
            if isinstance(node.op, ast.Mult) and isinstance(a, (str, bytes, list, tuple)) or isinstance(b, (str, bytes, list, tuple)) and isinstance(node.op, ast.Mult):
                return _NO
            return _BINOPS[type(node.op)](a, b)
        if isinstance(node, ast.IfExp):
            t = self.ev(node.test, scope)
            if t is _NO:
                return _NO
            return self.ev(node.body if t else node.orelse, scope)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and isinstance(node.ctx if hasattr(node, "ctx") else ast.Load(), ast.Load):
            items = [self.ev(e, scope) for e in node.elts]
            if any(i is _NO or isinstance(e, ast.Starred) for i, e in zip(items, node.elts)):
                return _NO
            return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            base, idx = self.ev(node.value, scope), self.ev(node.slice, scope)
            if base is _NO or idx is _NO:
                return _NO
            return base[idx]
        if isinstance(node, ast.Slice):
            parts = [self.ev(p, scope) if p is not None else None for p in (node.lower, node.upper, node.step)]
            return _NO if _NO in parts else slice(*parts)
        return _NO

    def _member(self, class_name: str, name: str, call: tuple | None = None) -> Any:
        """A field, pure property or (with ``call`` = (args, kwargs)) pure method of a config object."""
        obj, prefix = self.model.objects[class_name]
        member = inspect.getattr_static(type(obj), name, None)
        if call is None:
            if self.model.field_known((obj, prefix), name):
                return getattr(obj, name)
            if isinstance(member, property) and self.model.member_pure(type(obj), name):
                return getattr(obj, name)
            return _NO
        if inspect.isfunction(member) and self.model.member_pure(type(obj), name):
            args, kwargs = call
            if all(emittable(a) for a in list(args) + list(kwargs.values())):
                return getattr(obj, name)(*args, **kwargs)
        return _NO

    def truth(self, node: ast.expr, scope: Scope | None) -> Any:
        """The truth of a test: its value when known, else decided by one known operand of an
        ``and`` (falsy) or ``or`` (truthy) whose other operands are side-effect-free reads of
        config objects (a comparison of validated settings cannot raise)."""
        v = self.ev(node, scope)
        if v is not _NO or not isinstance(node, ast.BoolOp):
            return v
        is_and = isinstance(node.op, ast.And)
        for operand in node.values:
            w = self.ev(operand, scope)
            if w is not _NO and bool(w) != is_and and all(self.config_read(o, scope) for o in node.values):
                return w
        return _NO

    def config_read(self, node: ast.expr, scope: Scope | None) -> bool:
        if self.ev(node, scope) is not _NO:
            return True
        if isinstance(node, ast.Attribute):
            base = self.typ(node.value, scope)
            return base is not None and not base.startswith("obj:") and isinstance(node.ctx, ast.Load)
        if isinstance(node, ast.Compare):
            return all(self.config_read(n, scope) for n in [node.left, *node.comparators])
        if isinstance(node, ast.BoolOp):
            return all(self.config_read(n, scope) for n in node.values)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return self.config_read(node.operand, scope)
        return isinstance(node, ast.Constant)

    # ---- statements

    def fold_module(self, tree: ast.Module) -> None:
        self.type_checking = any(isinstance(st, ast.ImportFrom) and st.module == "typing" and
                                 any(a.name == "TYPE_CHECKING" and not a.asname for a in st.names) for st in tree.body)
        for n in ast.walk(tree):  # attributes set by a literal name are never facts
            if _setattr_call(n) and isinstance(n.args[1], ast.Constant):
                self.col.dirty.add(str(n.args[1].value))
        for n in ast.walk(tree):  # nor any attribute of a class whose methods set their own by computed names
            if isinstance(n, ast.ClassDef):
                for m in n.body:
                    if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and m.args.args and _sets_own_attrs(m, m.args.args[0].arg):
                        self.col.opaque_classes.add(f"{self.module}:{n.name}")
        tree.body = self.block(tree.body, None) or [ast.Pass()]

    def block(self, stmts: list[ast.stmt], scope: Scope | None, top: bool = False) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for i, st in enumerate(stmts):
            out.extend(self.stmt(st, scope, top))
            if out and isinstance(out[-1], (ast.Return, ast.Raise, ast.Continue, ast.Break)):
                if i + 1 < len(stmts):
                    self.changed += 1  # the rest of the block cannot run
                break
        return out

    def stmt(self, st: ast.stmt, scope: Scope | None, top: bool) -> list[ast.stmt]:
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self.function(st, scope)
            return [st]
        if isinstance(st, ast.ClassDef):
            self.classdef(st, scope)
            return [st]
        if isinstance(st, (ast.If, ast.While)):
            st.test = self.expr(st.test, scope)
            v = self.truth(st.test, scope)
            if isinstance(st, ast.If) and v is not _NO:
                self.changed += 1
                return self.block(st.body if v else st.orelse, scope, top)
            if isinstance(st, ast.While) and v is not _NO and not v:
                self.changed += 1
                return self.block(st.orelse, scope, top)
            st.body = self.block(st.body, scope) or [ast.Pass()]
            st.orelse = self.block(st.orelse, scope)
            return [st]
        if isinstance(st, ast.Assert):
            st.test = self.expr(st.test, scope)
            v = self.truth(st.test, scope)
            if v is not _NO and v:
                self.changed += 1
                return []
            return [st]
        if isinstance(st, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            if st.value is not None:
                st.value = self.expr(st.value, scope)
            targets = st.targets if isinstance(st, ast.Assign) else [st.target]
            for t in targets:
                self.target(t, scope)
            self.record_stores(st, scope, top)
            if (isinstance(st, ast.Assign) and top and scope is not None and not scope.opaque and len(st.targets) == 1
                    and isinstance(st.targets[0], ast.Name) and st.targets[0].id in scope.single):
                v = self.ev(st.value, scope)
                if v is not _NO and emittable(v):
                    scope.consts[st.targets[0].id] = v
            return [st]
        if isinstance(st, (ast.For, ast.AsyncFor)):
            st.iter = self.expr(st.iter, scope)
            self.target(st.target, scope)
            st.body = self.block(st.body, scope) or [ast.Pass()]
            st.orelse = self.block(st.orelse, scope)
            return [st]
        if isinstance(st, (ast.With, ast.AsyncWith)):
            for item in st.items:
                item.context_expr = self.expr(item.context_expr, scope)
                if item.optional_vars is not None:
                    self.target(item.optional_vars, scope)
            st.body = self.block(st.body, scope) or [ast.Pass()]
            return [st]
        if isinstance(st, ast.Try) or type(st).__name__ == "TryStar":
            st.body = self.block(st.body, scope) or [ast.Pass()]
            for h in st.handlers:
                h.body = self.block(h.body, scope) or [ast.Pass()]
            st.orelse = self.block(st.orelse, scope)
            st.finalbody = self.block(st.finalbody, scope)
            return [st]
        if isinstance(st, ast.Delete):
            for t in st.targets:
                self.target(t, scope)
            return [st]
        if isinstance(st, (ast.Expr, ast.Return)) and st.value is not None:
            st.value = self.expr(st.value, scope)
        elif isinstance(st, ast.Raise):
            st.exc = self.expr(st.exc, scope) if st.exc is not None else None
        return [st]

    def target(self, t: ast.expr, scope: Scope | None) -> None:
        """Fold the loads inside an assignment target (``x[cfg.k] = ...``); record attribute stores."""
        for n in ast.walk(t):
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, (ast.Store, ast.Del)):
                if not (self._self_attr(n, scope)):
                    self.col.dirty.add(n.attr)
            if isinstance(n, ast.Subscript) and isinstance(n.ctx, (ast.Store, ast.Del)):
                n.slice = self.expr(n.slice, scope)

    def record_stores(self, st: ast.stmt, scope: Scope | None, top: bool) -> None:
        """``self.attr = value`` in a method: the facts of the next pass."""
        if not isinstance(st, ast.Assign):
            for n in ast.walk(st.target):
                if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
                    self.col.dirty.add(n.attr)  # augmented or annotated: never a constant
            return
        init_top = top and scope is not None and scope.function == "__init__"
        for t in st.targets:
            pairs: list[tuple[ast.expr, ast.expr | None]] = [(t, st.value)]
            if isinstance(t, (ast.Tuple, ast.List)):
                vals = st.value.elts if isinstance(st.value, (ast.Tuple, ast.List)) and len(st.value.elts) == len(t.elts) else None
                pairs = [(e, vals[i] if vals else None) for i, e in enumerate(t.elts)]
            for tgt, value in pairs:
                if isinstance(tgt, ast.Attribute) and self._self_attr(tgt, scope):
                    typ = self.typ(value, scope) if value is not None else None
                    v = self.ev(value, scope) if value is not None else _NO
                    if v is not _NO and not (emittable(v) and type(v) is not tuple):
                        v = _NO
                    once = init_top and len(st.targets) == 1 and isinstance(t, ast.Attribute)
                    self.col.self_stores.setdefault(tgt.attr, []).append((scope.class_key, typ, v, once))

    def classdef(self, node: ast.ClassDef, scope: Scope | None) -> None:
        key = f"{self.module}:{node.name}"
        self.col.bases[key] = {b.id if isinstance(b, ast.Name) else b.attr for b in node.bases if isinstance(b, (ast.Name, ast.Attribute))}
        obj = self.model.objects.get(node.name)
        config_class = node.name if obj is not None and type(obj[0]).__module__ == self.module else None
        for st in node.body:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.col.class_names.add(st.name)
            for n in ast.walk(st) if isinstance(st, (ast.Assign, ast.AnnAssign, ast.AugAssign)) else ():
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                    self.col.class_names.add(n.id)
        for st in node.body:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
                static = any(isinstance(d, ast.Name) and d.id in ("staticmethod", "classmethod") for d in st.decorator_list)
                self.function(st, scope, None if static else key, config_class if not static else None)
            elif isinstance(st, ast.ClassDef):
                self.classdef(st, scope)

    def function(self, node: ast.FunctionDef | ast.AsyncFunctionDef, parent: Scope | None, class_key: str | None = None,
                 config_class: str | None = None) -> None:
        counts, single, opaque, binds = _stores(node.body, node.args)
        classes = {**self.facts.classes, **{name: name for name in self.model.objects}}
        self_name = node.args.args[0].arg if class_key and node.args.args else None
        scope = Scope(parent, set(counts), {}, self_name, class_key if self_name else None, config_class)
        scope.function, scope.opaque = node.name, opaque
        scope.single = set() if opaque else single
        annotated: dict[str, str | None] = {}
        for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
            annotated[a.arg] = _annotation_class(a.annotation, classes)
        if self_name:
            annotated[self_name] = config_class or "obj:" + class_key
        for _ in range(3):  # a local typed by another local (t = cfg.train)
            for name in counts:
                sites = binds.get(name, [])
                found = set()
                if name in annotated:
                    found.add(annotated[name])
                for value in sites:
                    found.add(self.typ(value, scope) if value is not None else None)
                if len(found) == 1 and None not in found:
                    scope.types[name] = found.pop()
        node.body = self.block(node.body, scope, top=True) or [ast.Pass()]
        if scope.consts and not opaque:
            loads = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
            body = [st for st in node.body
                    if not (isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name)
                            and st.targets[0].id in scope.consts and st.targets[0].id not in loads and _is_literal(st.value))]
            if len(body) < len(node.body):
                self.changed += 1
                node.body = body or [ast.Pass()]
        node.body = self.drop_unused_imports(node) or [ast.Pass()]

    def drop_unused_imports(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.stmt]:
        """Function-level ``from pgolf... import`` (and standard-library) names nothing reads any more."""
        loads = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        body = []
        for st in node.body:
            if isinstance(st, ast.ImportFrom) and st.level == 0 and st.module and _droppable_import(st.module):
                names = [a for a in st.names if (a.asname or a.name) in loads or a.name == "*"]
                if len(names) < len(st.names):
                    self.changed += 1
                    if not names:
                        continue
                    st.names = names
            elif isinstance(st, ast.Import) and all(_droppable_import(a.name) for a in st.names):
                names = [a for a in st.names if (a.asname or a.name).split(".")[0] in loads]
                if len(names) < len(st.names):
                    self.changed += 1
                    if not names:
                        continue
                    st.names = names
            body.append(st)
        return body

    # ---- expressions

    def expr(self, node: ast.expr | None, scope: Scope | None) -> ast.expr | None:
        if node is None or isinstance(node, (ast.Constant, ast.JoinedStr)):
            return node  # f-strings as they are (before 3.12 a literal inside one cannot hold its quotes or a backslash)
        if isinstance(node, ast.Lambda):
            a = node.args
            names = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [v for v in (a.vararg, a.kwarg) if v]}
            node.body = self.expr(node.body, Scope(scope, names, {}))
            return node
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            names = {n.id for g in node.generators for n in ast.walk(g.target) if isinstance(n, ast.Name)}
            inner = Scope(scope, names, {})
            for g in node.generators:
                g.iter = self.expr(g.iter, inner)
                g.ifs = [self.expr(c, inner) for c in g.ifs]
            if isinstance(node, ast.DictComp):
                node.key, node.value = self.expr(node.key, inner), self.expr(node.value, inner)
            else:
                node.elt = self.expr(node.elt, inner)
            return node
        if isinstance(node, (ast.Attribute, ast.Call, ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.IfExp, ast.Name,
                             ast.Subscript)) and isinstance(getattr(node, "ctx", ast.Load()), ast.Load):
            v = self.ev(node, scope)
            if v is not _NO and emittable(v):
                lit = literal(v)
                new, old = ast.unparse(lit), ast.unparse(node)
                if new == old:
                    return node
                if len(new) <= len(old):
                    self.changed += 1
                    return lit
        if isinstance(node, ast.BoolOp):
            is_and = isinstance(node.op, ast.And)
            kept = []
            for i, operand in enumerate(node.values):
                operand = self.expr(operand, scope)
                v = self.ev(operand, scope)
                if v is not _NO and bool(v) == is_and and i < len(node.values) - 1:
                    continue  # passed over: its value is never the result
                kept.append(operand)
                if v is not _NO:
                    break  # short-circuits here (or is the last operand)
            if len(kept) < len(node.values):
                self.changed += 1
            if len(kept) == 1:
                return kept[0]
            node.values = kept
            return node
        if isinstance(node, ast.IfExp):
            node.test = self.expr(node.test, scope)
            t = self.truth(node.test, scope)
            if t is not _NO:
                self.changed += 1
                return self.expr(node.body if t else node.orelse, scope)
        for name, value in ast.iter_fields(node):
            if isinstance(value, ast.expr) and name != "ctx":
                setattr(node, name, self.expr(value, scope))
            elif isinstance(value, list):
                setattr(node, name, [self.expr(v, scope) if isinstance(v, ast.expr) else self._keyword(v, scope) for v in value])
        return node

    def _keyword(self, node: Any, scope: Scope | None) -> Any:
        if isinstance(node, ast.keyword):
            node.value = self.expr(node.value, scope)
        return node


_COMPARE = {
    ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b, ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
    ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b,
}
_BINOPS = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b, ast.Pow: lambda a, b: a ** b,
    ast.BitAnd: lambda a, b: a & b, ast.BitOr: lambda a, b: a | b, ast.BitXor: lambda a, b: a ^ b,
    ast.LShift: lambda a, b: a << b if b < 64 else _raise(), ast.RShift: lambda a, b: a >> b,
}


def _raise():
    raise OverflowError


# ------------------------------------------------------------------------------------------------
# the whole bundle


def assigned_fields(trees: dict[str, ast.Module], config_classes: dict[str, str]) -> set[str]:
    """Attribute names that bundled code may assign on a config object: every attribute store
    except ``self.x = ...`` in a method of a class that is not a config class (whose ``self`` is
    never one), literal ``setattr`` names, ``replace(...)`` keywords and config constructor
    keywords. ``config_classes``: class name -> defining module."""
    out: set[str] = set()

    def visit(node: ast.AST, self_name: str | None) -> None:
        for n in ast.walk(node):
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, (ast.Store, ast.Del)):
                if not (self_name and isinstance(n.value, ast.Name) and n.value.id == self_name):
                    out.add(n.attr)
            elif isinstance(n, ast.Subscript) and isinstance(n.ctx, (ast.Store, ast.Del)) and isinstance(n.value, ast.Attribute):
                out.add(n.value.attr)  # x.field[i] = ...: the field's list or dict changes
            elif isinstance(n, ast.Call):
                f = n.func
                fname = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if isinstance(f, ast.Attribute) and f.attr in _MUTATORS and isinstance(f.value, ast.Attribute):
                    out.add(f.value.attr)  # x.field.append(...)
                if fname in ("setattr", "delattr") and len(n.args) >= 2 and isinstance(n.args[1], ast.Constant):
                    out.add(str(n.args[1].value))
                elif fname == "replace" or fname in config_classes:
                    out.update(k.arg for k in n.keywords if k.arg)

    def walk(body: list[ast.stmt], module: str) -> None:
        for st in body:
            if isinstance(st, ast.ClassDef):
                config = config_classes.get(st.name) == module
                for item in st.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.args.args and not config:
                        visit(item, item.args.args[0].arg)
                    elif isinstance(item, ast.ClassDef):
                        walk([item], module)
                    else:
                        visit(item, None)
            else:
                visit(st, None)

    for module, tree in trees.items():
        if module != "pgolf.config":  # builds config objects: its stores run before a run reads them
            walk(tree.body, module)
    return out


def set_live_table(source: str, live: set[str]) -> str:
    """``LIVE = None`` of :mod:`pgolf.config.envvars` replaced by the bundle's live settings."""
    tree = ast.parse(source)
    for st in tree.body:
        if isinstance(st, ast.Assign) and [ast.unparse(t) for t in st.targets] == [LIVE_TABLE[1]]:
            st.value = ast.parse(repr(tuple(sorted(live))), mode="eval").body
            return ast.unparse(tree)
        if isinstance(st, ast.AnnAssign) and ast.unparse(st.target) == LIVE_TABLE[1]:
            st.value = ast.parse(repr(tuple(sorted(live))), mode="eval").body
            return ast.unparse(tree)
    raise AssertionError(f"{LIVE_TABLE[0]} has no {LIVE_TABLE[1]} assignment")


def drop_all_lists(sources: dict[str, str]) -> dict[str, str]:
    """Without the modules' ``__all__`` lists (whose names would keep definitions alive) when no
    bundled code star-imports or reads ``__all__``."""
    trees = {m: ast.parse(s) for m, s in sources.items()}
    for tree in trees.values():
        for n in ast.walk(tree):
            if (isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names)) or (
                    isinstance(n, ast.Name) and n.id == "__all__" and isinstance(n.ctx, ast.Load)) or (
                    isinstance(n, ast.Attribute) and n.attr == "__all__") or (isinstance(n, ast.Constant) and n.value == "__all__"):
                return sources
    out = {}
    for m, tree in trees.items():
        body = [st for st in tree.body if not (isinstance(st, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and "__all__" in
                                               {ast.unparse(t) for t in (st.targets if isinstance(st, ast.Assign) else [st.target])})]
        if len(body) == len(tree.body):
            out[m] = sources[m]
        else:
            tree.body = body or [ast.Pass()]
            out[m] = ast.unparse(tree)
    return out


def imported_modules(sources: dict[str, str], keep: set[str]) -> set[str]:
    """``keep`` closed over the pgolf modules that kept code imports (anywhere, lazily too) or
    names as a string, and over parent packages."""
    from pgolf.train.codesize import _pgolf_imports

    out = {m for m in keep if m in sources}
    todo = sorted(out)
    while todo:
        m = todo.pop()
        found = _pgolf_imports(sources[m], top_level_only=False)
        found |= {n.value for n in ast.walk(ast.parse(sources[m])) if isinstance(n, ast.Constant) and n.value in sources}
        parts = m.split(".")
        found |= {".".join(parts[:i]) for i in range(1, len(parts))}
        new = (found & set(sources)) - out
        out |= new
        todo += sorted(new)
    return out


@dataclasses.dataclass
class FoldReport:
    passes: int = 0
    live: tuple[str, ...] = ()
    dropped_modules: tuple[str, ...] = ()


def fold_sources(sources: dict[str, str], cfg: RunConfig, live: set[str], roots: set[str], keep_modules: set[str],
                 max_passes: int = 16) -> tuple[dict[str, str], FoldReport]:
    """``sources`` ({module: source}) folded for ``cfg`` (see the module docstring), shaken from
    ``roots`` and without the modules no kept code imports (``keep_modules`` always stay); fold and
    shake repeat until nothing changes."""
    from pgolf.train.codesize import shake

    model = ConfigModel(cfg, live)
    classes = {name: type(obj).__module__ for name, (obj, _) in model.objects.items()}
    model.stored = assigned_fields({m: ast.parse(s) for m, s in sources.items()}, classes)
    table = set(live)  # what the script takes from the environment: every setting not folded
    for name, (obj, prefix) in model.objects.items():
        table |= {prefix + f.name for f in dataclasses.fields(obj) if f.name in model.stored and prefix}
    current = drop_all_lists(dict(sources))
    if LIVE_TABLE[0] in current:
        from pgolf.config.envvars import CHALLENGE_ENV

        current[LIVE_TABLE[0]] = set_live_table(current[LIVE_TABLE[0]], table - set(CHALLENGE_ENV.values()))
    facts = Facts()
    report = FoldReport(live=tuple(sorted(table)))
    for report.passes in range(1, max_passes + 1):
        collector = Collector()
        out = {}
        for m, src in current.items():
            tree = ast.parse(src)
            Folder(model, facts, collector, m).fold_module(tree)
            out[m] = ast.unparse(tree)
        out = shake(out, roots)
        kept = imported_modules(out, keep_modules)
        out = {m: s for m, s in out.items() if m in kept}
        new_facts = collector.facts()
        if out == current and new_facts == facts:
            break
        current, facts = out, new_facts
    report.dropped_modules = tuple(sorted(set(sources) - set(current)))
    return current, report
