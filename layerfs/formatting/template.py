"""A Go ``text/template`` engine with docker's template functions.

``Template.parse(text)`` reads Go's syntax: text and ``{{actions}}`` with ``{{-``/``-}}``
trim markers and ``{{/* comments */}}``; pipelines of commands joined by ``|``; fields
(``.A.B``), variables (``$``, ``$x``, ``$x := ...``, ``$x = ...``), literals (strings, raw
strings, characters, numbers, ``true``, ``false``, ``nil``), parenthesised pipelines; and
``if``/``else if``/``else``, ``range`` (with ``$i, $v :=``, ``else``, ``break``,
``continue``), ``with``/``else with`` and ``end``. ``define``, ``template`` and ``block``
are refused with an error (docker's formats never name sub-templates).

``execute(data)`` runs it the way Go does on the values of :mod:`.values`, with the
functions of :mod:`.functions` (Go's builtins and docker's); ``with_functions`` swaps some
of them, as docker does to render a table's header.

Errors are :class:`~layerfs.errors.TemplateError`, one line in Go's words with the line and
column (the bytes before it on its line), as docker prints them: ``template parsing error:
template: :1:2: executing "" at <.Foo>: can't evaluate field Foo in type image``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from layerfs.errors import TemplateError
from layerfs.formatting import values as gv
from layerfs.formatting.functions import (
    BUILTINS,
    DOCKER_FUNCTIONS,
    HEADER_FUNCTIONS,
    Function,
    FunctionError,
)
from layerfs.formatting.lexer import PREFIX, Lexer, Token, where
from layerfs.formatting.values import MISSING, GoMap, GoNil, GoStruct

__all__ = ["HEADER_FUNCTIONS", "Template"]

# -- the parse tree ----------------------------------------------------------------------------


class _Node:
    # Plain classes, not dataclasses: defining a dataclass costs a millisecond at import,
    # and every listing command imports this module.
    __slots__ = ("pos",)

    def __init__(self, pos: int) -> None:
        self.pos = pos


class _Text(_Node):
    __slots__ = ("text",)

    def __init__(self, pos: int, text: str) -> None:
        super().__init__(pos)
        self.text = text


class _Operand(_Node):
    __slots__ = ("chain", "kind", "value")

    def __init__(self, pos: int, kind: str, value: Any = None) -> None:
        super().__init__(pos)
        self.kind = kind  # field, variable, dot, ident, literal, nil, pipe
        self.value = value  # field: names; variable: (name, names); ident: name; literal
        self.chain: list[str] = []  # fields after a parenthesised pipeline

    def source(self) -> str:
        if self.kind == "field":
            return "." + ".".join(str(n) for n in self.value)
        if self.kind == "variable":
            name, names = self.value
            return str(name) + "".join("." + n for n in names)
        if self.kind == "dot":
            return "."
        if self.kind == "ident":
            return str(self.value)
        if self.kind == "nil":
            return "nil"
        if self.kind == "pipe":
            return "(" + str(self.value.source()) + ")" + "".join("." + n for n in self.chain)
        return gv.quote(self.value) if isinstance(self.value, str) else gv.sprint(self.value)


class _Command(_Node):
    __slots__ = ("args",)

    def __init__(self, pos: int, args: list[_Operand]) -> None:
        super().__init__(pos)
        self.args = args

    def source(self) -> str:
        return " ".join(a.source() for a in self.args)


class _Pipeline(_Node):
    __slots__ = ("assign", "commands", "declare")

    def __init__(self, pos: int, declare: list[str], assign: bool, commands: list[_Command]):
        super().__init__(pos)
        self.declare = declare
        self.assign = assign  # "=" instead of ":="
        self.commands = commands

    def source(self) -> str:
        text = " | ".join(c.source() for c in self.commands)
        if self.declare:
            text = ", ".join(self.declare) + (" = " if self.assign else " := ") + text
        return text


class _Action(_Node):
    __slots__ = ("pipe",)

    def __init__(self, pos: int, pipe: _Pipeline) -> None:
        super().__init__(pos)
        self.pipe = pipe


class _Branch(_Node):
    __slots__ = ("body", "kind", "otherwise", "pipe")

    def __init__(
        self, pos: int, kind: str, pipe: _Pipeline, body: list[_Node], otherwise: list[_Node] | None
    ) -> None:
        super().__init__(pos)
        self.kind = kind  # if, range, with
        self.pipe = pipe
        self.body = body
        self.otherwise = otherwise


class _Jump(_Node):
    __slots__ = ("kind",)

    def __init__(self, pos: int, kind: str) -> None:
        super().__init__(pos)
        self.kind = kind  # break, continue


class _Parser:
    def __init__(self, text: str, tokens: list[Token], functions: Mapping[str, Function]) -> None:
        self.text = text
        self.tokens = tokens
        self.index = 0
        self.functions = functions
        self.scopes: list[set[str]] = [{"$"}]
        self.range_depth = 0

    def error(self, pos: int, message: str) -> TemplateError:
        return TemplateError(f"{PREFIX}{where(self.text, pos)}: {message}")

    def peek(self, skip_space: bool = True) -> Token:
        index = self.index
        while skip_space and self.tokens[index].kind == "space":
            index += 1
        return self.tokens[index]

    def next(self, skip_space: bool = True) -> Token:
        while skip_space and self.tokens[self.index].kind == "space":
            self.index += 1
        token = self.tokens[self.index]
        self.index += 1
        return token

    def parse(self) -> list[_Node]:
        nodes, end = self.list()
        if end is not None:
            raise self.error(end.pos, f"unexpected {{{{{end.value}}}}}")
        return nodes

    def list(self, stop: tuple[str, ...] = ()) -> tuple[list[_Node], Token | None]:
        """Nodes up to EOF, or up to one of ``stop`` (``{{end}}``/``{{else}}``): (nodes, stop)."""
        nodes: list[_Node] = []
        while True:
            token = self.next(skip_space=False)
            if token.kind == "eof":
                if stop:
                    raise self.error(token.pos, "unexpected EOF")
                return nodes, None
            if token.kind == "text":
                nodes.append(_Text(token.pos, token.value))
                continue
            assert token.kind == "left"
            word = self.peek()
            if word.kind == "keyword" and word.value in ("end", "else"):
                if word.value not in stop:
                    raise self.error(word.pos, f"unexpected {{{{{word.value}}}}}")
                self.next()
                return nodes, word
            nodes.append(self.action(token))

    def action(self, left: Token) -> _Node:
        word = self.peek()
        if word.kind == "keyword":
            self.next()
            if word.value in ("if", "range", "with"):
                return self.branch(word)
            if word.value in ("break", "continue"):
                if not self.range_depth:
                    raise self.error(word.pos, f"{{{{{word.value}}}}} outside {{{{range}}}}")
                self.expect("right", f"in {{{{{word.value}}}}}")
                return _Jump(word.pos, word.value)
            if word.value in ("define", "template", "block"):
                raise self.error(word.pos, f"{{{{{word.value}}}}}: sub-templates are not supported")
        return _Action(left.pos, self.pipeline("command", allow_declare=True))

    def expect(self, kind: str, context: str) -> Token:
        token = self.next()
        if token.kind != kind:
            raise self.error(token.pos, f"unexpected {self.describe(token)} {context}")
        return token

    def describe(self, token: Token) -> str:
        if token.kind == "right":
            return '"}}"'
        if token.kind == "eof":
            return "EOF"
        text = self.text[token.pos : token.pos + 20].split("}}")[0].split(" ")[0]
        return f"<{text}>" if text else repr(token.kind)

    def branch(self, word: Token) -> _Node:
        kind = word.value
        self.scopes.append(set())  # variables of the pipeline live until {{end}}
        pipe = self.pipeline(kind, allow_declare=True, range_vars=kind == "range")
        if kind == "range":
            self.range_depth += 1
        body, end = self.list(stop=("end", "else"))
        if kind == "range":
            self.range_depth -= 1
        otherwise: list[_Node] | None = None
        assert end is not None
        if end.value == "else":
            follow = self.peek()
            if follow.kind == "keyword" and follow.value in ("if", "with") and kind != "range":
                # {{else if ...}} / {{else with ...}}: a nested branch sharing our {{end}}.
                self.next()
                otherwise = [self.branch(follow)]
            else:
                self.expect("right", "in {{else}}")
                otherwise, end = self.list(stop=("end",))
                assert end is not None
                self.expect("right", "in {{end}}")
        else:
            self.expect("right", "in {{end}}")
        self.scopes.pop()
        return _Branch(word.pos, kind, pipe, body, otherwise)

    def pipeline(self, context: str, *, allow_declare: bool, range_vars: bool = False) -> _Pipeline:
        start = self.peek()
        declare: list[str] = []
        assign = False
        if allow_declare and start.kind == "variable":
            # Look ahead: "$x :=", "$x =", or "$i, $v :=" (range only).
            saved = self.index
            names = [self.next().value]
            if range_vars and self.peek().kind == "comma":
                self.next()
                second = self.next()
                if second.kind != "variable":
                    raise self.error(second.pos, "range can only initialize variables")
                names.append(second.value)
            follow = self.peek()
            if follow.kind in ("declare", "assign") and (
                len(names) == 1 or follow.kind == "declare"
            ):
                self.next()
                declare = names
                assign = follow.kind == "assign"
                for name in names:
                    if assign:
                        if not any(name in scope for scope in self.scopes):
                            raise self.error(start.pos, f"undefined variable: {name}")
                    else:
                        self.scopes[-1].add(name)
            else:
                self.index = saved
        commands: list[_Command] = []
        while True:
            token = self.peek()
            if token.kind in ("right", "rparen"):
                if not commands:
                    raise self.error(token.pos, f"missing value for {context}")
                if token.kind == "right":
                    self.next()
                return _Pipeline(start.pos, declare, assign, commands)
            commands.append(self.command())
            token = self.peek()
            if token.kind == "pipe":
                pipe_token = self.next()
                if self.peek().kind in ("right", "rparen"):
                    raise self.error(pipe_token.pos, "missing command after |")

    def command(self) -> _Command:
        args: list[_Operand] = []
        start = self.peek()
        while True:
            token = self.peek()
            if token.kind in ("right", "rparen", "pipe"):
                break
            if args and self.tokens[self.index].kind != "space":
                raise self.error(token.pos, f"unexpected {self.describe(token)} in operand")
            args.append(self.operand())
        if not args:
            raise self.error(start.pos, "empty command")
        return _Command(start.pos, args)

    def operand(self) -> _Operand:
        token = self.next()
        operand: _Operand
        if token.kind == "field":
            names = [token.value]
            pos = token.pos
            while self.peek(skip_space=False).kind == "field":
                follow = self.next(skip_space=False)
                pos = follow.pos if len(names) == 1 else pos  # Go's chain starts there
                names.append(follow.value)
            return _Operand(pos, "field", names)
        if token.kind == "variable":
            if not any(token.value in scope for scope in self.scopes):
                raise self.error(token.pos, f'undefined variable "{token.value}"')
            names = []
            while self.peek(skip_space=False).kind == "field":
                names.append(self.next(skip_space=False).value)
            return _Operand(token.pos, "variable", (token.value, names))
        if token.kind == "dot":
            operand = _Operand(token.pos, "dot")
        elif token.kind == "ident":
            if token.value not in self.functions:
                raise self.error(token.pos, f'function "{token.value}" not defined')
            operand = _Operand(token.pos, "ident", token.value)
        elif token.kind in ("string", "number", "bool"):
            operand = _Operand(token.pos, "literal", token.value)
        elif token.kind == "nil":
            operand = _Operand(token.pos, "nil")
        elif token.kind == "lparen":
            pipe = self.pipeline("parenthesized pipeline", allow_declare=False)
            self.expect("rparen", "in parenthesized pipeline")
            operand = _Operand(token.pos, "pipe", pipe)
        else:
            raise self.error(token.pos, f"unexpected {self.describe(token)} in operand")
        while self.peek(skip_space=False).kind == "field":
            if operand.kind in ("literal", "nil", "ident"):
                raise self.error(token.pos, f"unexpected . after term {operand.source()!r}")
            operand.chain.append(self.next(skip_space=False).value)
        return operand


# -- execution ---------------------------------------------------------------------------------


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class Template:
    """A parsed template; ``execute(data)`` renders it."""

    def __init__(
        self,
        text: str,
        nodes: list[_Node],
        functions: Mapping[str, Function],
        missing_key_error: bool = False,
    ) -> None:
        self.text = text
        self.nodes = nodes
        self.functions = functions
        self.missing_key_error = missing_key_error
        self._flat = _flat_fields(nodes)

    @classmethod
    def parse(
        cls,
        text: str,
        functions: Mapping[str, Function] | None = None,
        *,
        missing_key_error: bool = False,
    ) -> Template:
        """Parse Go template syntax; ``missing_key_error`` makes a missing map key an error."""
        funcs = dict(BUILTINS)
        funcs.update(DOCKER_FUNCTIONS if functions is None else functions)
        tokens = Lexer(text).run()
        nodes = _Parser(text, tokens, funcs).parse()
        return cls(text, nodes, funcs, missing_key_error)

    def with_functions(self, functions: Mapping[str, Function]) -> Template:
        """The same template with some functions replaced (docker's header functions)."""
        return Template(
            self.text, self.nodes, {**self.functions, **functions}, self.missing_key_error
        )

    def execute(self, data: Any) -> str:
        if self._flat is not None and isinstance(data, GoStruct):
            # Text and {{.Field}} only (every default table): looked up directly, a listing
            # of thousands of rows is not walked node by node. Anything unusual (a field
            # the row lacks) takes the general way, which reports it as Go does.
            values = data.values
            parts: list[str] = []
            for text, field in self._flat:
                if field is None:
                    parts.append(text)
                elif field in values:
                    parts.append(gv.sprint(values[field]))
                else:
                    break
            else:
                return "".join(parts)
        out: list[str] = []
        _Run(self, out).walk(self.nodes, data, [("$", data)])
        return "".join(out)


def _flat_fields(nodes: list[_Node]) -> list[tuple[str, str | None]] | None:
    """(text, None) and ("", field name) items if the template is only text and ``{{.F}}``."""
    flat: list[tuple[str, str | None]] = []
    for node in nodes:
        if isinstance(node, _Text):
            flat.append((node.text, None))
            continue
        if not isinstance(node, _Action) or node.pipe.declare or len(node.pipe.commands) != 1:
            return None
        args = node.pipe.commands[0].args
        if len(args) != 1 or args[0].kind != "field" or args[0].chain:
            return None
        names = args[0].value
        if not isinstance(names, list) or len(names) != 1:
            return None
        flat.append(("", names[0]))
    return flat


class _Run:
    def __init__(self, template: Template, out: list[str]) -> None:
        self.template = template
        self.out = out
        self.node: _Node | None = None
        self.context = ""

    def error(self, message: str) -> TemplateError:
        pos = self.node.pos if self.node is not None else 0
        at = f" at <{self.context}>" if self.context else ""
        return TemplateError(
            f'{PREFIX}{where(self.template.text, pos)}: executing ""{at}: {message}'
        )

    def walk(self, nodes: list[_Node], dot: Any, variables: list[tuple[str, Any]]) -> None:
        for node in nodes:
            if isinstance(node, _Text):
                self.out.append(node.text)
            elif isinstance(node, _Action):
                value = self.pipeline(node.pipe, dot, variables)
                if not node.pipe.declare:
                    self.out.append(gv.sprint(value))
            elif isinstance(node, _Branch):
                self.branch(node, dot, variables)
            elif isinstance(node, _Jump):
                raise _Break() if node.kind == "break" else _Continue()

    def branch(self, node: _Branch, dot: Any, variables: list[tuple[str, Any]]) -> None:
        mark = len(variables)
        try:
            if node.kind == "range":
                self.range(node, dot, variables)
                return
            value = self.pipeline(node.pipe, dot, variables)
            if gv.is_true(value):
                self.walk(node.body, value if node.kind == "with" else dot, variables)
            elif node.otherwise is not None:
                self.walk(node.otherwise, dot, variables)
        finally:
            del variables[mark:]

    def range(self, node: _Branch, dot: Any, variables: list[tuple[str, Any]]) -> None:
        pipe = node.pipe
        declared = pipe.declare
        value = self.pipeline(_Pipeline(pipe.pos, [], False, pipe.commands), dot, variables)
        mark = len(variables)
        items = list(self.iterate(value, node))
        for key, item in items:
            del variables[mark:]
            if len(declared) == 1:
                variables.append((declared[0], item))
            elif len(declared) == 2:
                variables.append((declared[0], key))
                variables.append((declared[1], item))
            try:
                self.walk(node.body, item, variables)
            except _Continue:
                continue
            except _Break:
                break
        del variables[mark:]
        if not items and node.otherwise is not None:
            self.walk(node.otherwise, dot, variables)

    def iterate(self, value: Any, node: _Node) -> Iterator[tuple[Any, Any]]:
        if value is MISSING or isinstance(value, GoNil):
            return iter(())
        if isinstance(value, list | tuple):
            return iter(list(enumerate(value)))
        if isinstance(value, GoMap):
            value = value.items
        if isinstance(value, Mapping):
            return iter([(k, value[k]) for k in sorted(value, key=_sort_key)])
        if isinstance(value, int) and not isinstance(value, bool):
            return iter([(i, i) for i in range(value)])
        self.node = node
        raise self.error(f"range can't iterate over {gv.sprint(value)}")

    def pipeline(self, pipe: _Pipeline, dot: Any, variables: list[tuple[str, Any]]) -> Any:
        value: Any = _NO_FINAL
        for command in pipe.commands:
            value = self.command(command, dot, variables, value)
        for name in pipe.declare:
            if pipe.assign:
                for index in range(len(variables) - 1, -1, -1):
                    if variables[index][0] == name:
                        variables[index] = (name, value)
                        break
            else:
                variables.append((name, value))
        return value

    def command(
        self, command: _Command, dot: Any, variables: list[tuple[str, Any]], final: Any
    ) -> Any:
        first = command.args[0]
        self.node = first
        self.context = command.source()
        rest = command.args[1:]
        if first.kind == "ident":
            return self.call(first.value, rest, dot, variables, final)
        if rest or final is not _NO_FINAL:
            if first.kind in ("field", "variable") or first.chain:
                name = first.source().rsplit(".", 1)[-1]
                raise self.error(f"{name} has arguments but cannot be invoked as function")
            raise self.error(f"can't give argument to non-function {first.source()}")
        return self.operand(first, dot, variables)

    def operand(self, operand: _Operand, dot: Any, variables: list[tuple[str, Any]]) -> Any:
        self.node = operand
        if operand.kind == "field":
            return self.fields(dot, operand.value, operand.source())
        if operand.kind == "variable":
            name, names = operand.value
            value = self.variable(name, variables)
            return self.fields(value, names, operand.source()) if names else value
        if operand.kind == "dot":
            value = dot
        elif operand.kind == "literal":
            value = operand.value
        elif operand.kind == "nil":
            raise self.error("nil is not a command")
        elif operand.kind == "ident":
            value = self.call(operand.value, [], dot, variables, _NO_FINAL)
        else:  # a parenthesised pipeline
            value = self.pipeline(operand.value, dot, variables)
        if operand.chain:
            self.node = operand
            value = self.fields(value, operand.chain, operand.source())
        return value

    def variable(self, name: str, variables: list[tuple[str, Any]]) -> Any:
        for var, value in reversed(variables):
            if var == name:
                return value
        raise self.error(f"undefined variable: {name}")

    def fields(self, receiver: Any, names: list[str], source: str) -> Any:
        self.context = source
        value = receiver
        for index, name in enumerate(names):
            value = self.field(value, name, has_more=index + 1 < len(names))
        return value

    def field(self, receiver: Any, name: str, has_more: bool) -> Any:
        if isinstance(receiver, GoStruct):
            if name in receiver.values:
                return receiver.values[name]
            if receiver.type_name is None:  # docker's inspect: a JSON map underneath
                raise self.error(f'map has no entry for key "{name}"')
            raise self.error(f"can't evaluate field {name} in type {receiver.type_name}")
        if isinstance(receiver, GoMap):
            receiver = receiver.items
        if isinstance(receiver, Mapping):
            if name in receiver:
                return receiver[name]
            if self.template.missing_key_error:
                raise self.error(f'map has no entry for key "{name}"')
            return MISSING
        if receiver is None or isinstance(receiver, GoNil):
            raise self.error(f"nil pointer evaluating {gv.type_name(receiver)}.{name}")
        if receiver is MISSING:
            raise self.error(f"nil pointer evaluating interface {{}}.{name}")
        raise self.error(f"can't evaluate field {name} in type {gv.type_name(receiver)}")

    def call(
        self,
        name: str,
        arg_nodes: list[_Operand],
        dot: Any,
        variables: list[tuple[str, Any]],
        final: Any,
    ) -> Any:
        function = self.template.functions[name]
        context, node = self.context, self.node
        if name in ("and", "or"):
            # Go evaluates and/or lazily: stop at the first operand that decides.
            result: Any = None
            operands: list[Callable[[], Any]] = [
                functools.partial(self.operand, a, dot, variables) for a in arg_nodes
            ]
            if final is not _NO_FINAL:
                operands.append(functools.partial(_identity, final))
            if not operands:
                self.context, self.node = context, node
                raise self.error(f"wrong number of args for {name}: want at least 1 got 0")
            for get in operands:
                result = get()
                if gv.is_true(result) == (name == "or"):
                    return result
            return result
        args = [self.operand(a, dot, variables) for a in arg_nodes]
        if final is not _NO_FINAL:
            args.append(final)
        self.context, self.node = context, node
        try:
            return function(*args)
        except FunctionError as exc:
            raise self.error(f"error calling {name}: {exc}") from None
        except TypeError:
            raise self.error(f"wrong number of args for {name}: {_arity(function, args)}") from None


class _NoFinal:
    """No value is piped into the command."""


_NO_FINAL: Any = _NoFinal()


def _identity(value: Any) -> Any:
    return value


def _sort_key(key: Any) -> Any:
    return (0, key, "") if isinstance(key, int | float) else (1, 0, str(key))


def _arity(function: Function, args: list[Any]) -> str:
    import inspect  # only for this error message: it is slow to import

    try:
        params = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return f"got {len(args)}"
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        fixed = sum(1 for p in params if p.kind is not p.VAR_POSITIONAL)
        return f"want at least {fixed} got {len(args)}"
    return f"want {len(list(params))} got {len(args)}"
