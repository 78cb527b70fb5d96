"""Go template lexing: text, actions and the tokens inside them, with Go's positions.

Positions are offsets into the template text; :func:`where` turns one into Go's
``line:column`` (the column counts the bytes before it on its line), which every error
message carries.
"""

from __future__ import annotations

import re
from typing import Any

from layerfs.errors import TemplateError

PREFIX = "template parsing error: template: :"  # docker's words for every template error

_KEYWORDS = {
    "if",
    "else",
    "end",
    "range",
    "with",
    "define",
    "template",
    "block",
    "break",
    "continue",
    "nil",
    "true",
    "false",
}
_SPACE = " \t\r\n"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(
    r"[+-]?(?:0[xX][0-9a-fA-F_]+|0[bB][01_]+|0[oO][0-7_]+|"
    r"(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?)"
)


class Token:
    __slots__ = ("kind", "pos", "value")

    def __init__(self, kind: str, value: Any, pos: int) -> None:
        # text, left, right, space, field, variable, ident, string, char, number, bool,
        # nil, pipe, lparen, rparen, declare, assign, comma, keyword, eof
        self.kind = kind
        self.value = value
        self.pos = pos


class Lexer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[Token] = []

    def error(self, pos: int, message: str) -> TemplateError:
        return TemplateError(f"{PREFIX}{where(self.text, pos)}: {message}")

    def run(self) -> list[Token]:
        pos = 0
        text = self.text
        while True:
            start = text.find("{{", pos)
            if start < 0:
                if pos < len(text):
                    self.tokens.append(Token("text", text[pos:], pos))
                break
            inner = start + 2
            trim_left = text.startswith("-", inner) and text[inner + 1 : inner + 2] in tuple(_SPACE)
            chunk = text[pos:start]
            if trim_left:
                chunk = chunk.rstrip(_SPACE)
                inner += 2
            if chunk:
                self.tokens.append(Token("text", chunk, pos))
            pos = self._action(start, inner)
        self.tokens.append(Token("eof", None, len(text)))
        return self.tokens

    def _right_delim(self, pos: int) -> tuple[bool, int] | None:
        """At ``pos``: (trim, end) when the action closes here ("}}" or " -}}")."""
        text = self.text
        if text.startswith("}}", pos):
            return False, pos + 2
        if text[pos : pos + 1] in tuple(_SPACE) and text.startswith("-}}", pos + 1):
            return True, pos + 4
        return None

    def _after_action(self, trim: bool, end: int) -> int:
        if trim:
            while end < len(self.text) and self.text[end] in _SPACE:
                end += 1
        return end

    def _action(self, start: int, pos: int) -> int:
        text = self.text
        # A comment is the whole action: {{/* ... */}}, trim markers allowed around it.
        if text.startswith("/*", pos):
            close = text.find("*/", pos + 2)
            if close < 0:
                raise self.error(start, "unclosed comment")
            delim = self._right_delim(close + 2)
            if delim is None:
                raise self.error(start, "comment ends before closing delimiter")
            return self._after_action(*delim)
        self.tokens.append(Token("left", None, start))
        depth = 0
        while True:
            if pos >= len(text):
                raise self.error(start, "unclosed action")
            delim = self._right_delim(pos)
            if delim is not None:
                if depth:
                    raise self.error(pos, "unclosed left paren")
                self.tokens.append(Token("right", None, pos))
                return self._after_action(*delim)
            ch = text[pos]
            if ch in _SPACE:
                self.tokens.append(Token("space", None, pos))
                while pos < len(text) and text[pos] in _SPACE and self._right_delim(pos) is None:
                    pos += 1
            elif ch == "|":
                self.tokens.append(Token("pipe", None, pos))
                pos += 1
            elif ch == "(":
                depth += 1
                self.tokens.append(Token("lparen", None, pos))
                pos += 1
            elif ch == ")":
                if depth == 0:
                    raise self.error(pos, "unexpected right paren")
                depth -= 1
                self.tokens.append(Token("rparen", None, pos))
                pos += 1
            elif ch == ",":
                self.tokens.append(Token("comma", None, pos))
                pos += 1
            elif text.startswith(":=", pos):
                self.tokens.append(Token("declare", None, pos))
                pos += 2
            elif ch == "=":
                self.tokens.append(Token("assign", None, pos))
                pos += 1
            elif ch == '"':
                pos = self._string(pos)
            elif ch == "`":
                end = text.find("`", pos + 1)
                if end < 0:
                    raise self.error(pos, "unterminated raw quoted string")
                self.tokens.append(Token("string", text[pos + 1 : end], pos))
                pos = end + 1
            elif ch == "'":
                pos = self._char(pos)
            elif ch == "$":
                match = _IDENT.match(text, pos + 1)
                name = "$" + (match.group() if match else "")
                self.tokens.append(Token("variable", name, pos))
                pos += len(name)
            elif ch == "." and not text[pos + 1 : pos + 2].isdigit():
                match = _IDENT.match(text, pos + 1)
                if match is None:
                    self.tokens.append(Token("dot", None, pos))
                    pos += 1
                else:
                    self.tokens.append(Token("field", match.group(), pos))
                    pos = match.end()
            elif ch.isdigit() or ch in "+-." or (ch == "." and text[pos + 1 : pos + 2].isdigit()):
                match = _NUMBER.match(text, pos)
                if match is None or not match.group():
                    raise self.error(pos, f"unexpected {ch!r} in command")
                self.tokens.append(Token("number", _number(match.group(), self, pos), pos))
                pos = match.end()
                if pos < len(text) and (text[pos].isalnum() or text[pos] == "_"):
                    raise self.error(pos, f"bad number syntax: {text[match.start() : pos + 1]!r}")
            elif ch.isalpha() or ch == "_":
                match = _IDENT.match(text, pos)
                assert match is not None
                word = match.group()
                if word in ("true", "false"):
                    self.tokens.append(Token("bool", word == "true", pos))
                elif word == "nil":
                    self.tokens.append(Token("nil", None, pos))
                elif word in _KEYWORDS:
                    self.tokens.append(Token("keyword", word, pos))
                else:
                    self.tokens.append(Token("ident", word, pos))
                pos = match.end()
            else:
                raise self.error(pos, f"unexpected {ch!r} in command")

    def _string(self, pos: int) -> int:
        text = self.text
        end = pos + 1
        while True:
            if end >= len(text) or text[end] == "\n":
                raise self.error(pos, "unterminated quoted string")
            if text[end] == "\\":
                end += 2
                continue
            if text[end] == '"':
                break
            end += 1
        self.tokens.append(Token("string", _unquote(text[pos + 1 : end], self, pos), pos))
        return end + 1

    def _char(self, pos: int) -> int:
        text = self.text
        end = pos + 1
        while end < len(text) and text[end] != "'":
            end += 2 if text[end] == "\\" else 1
        if end >= len(text):
            raise self.error(pos, "unterminated character constant")
        value = _unquote(text[pos + 1 : end], self, pos)
        if len(value) != 1:
            raise self.error(pos, f"malformed character constant: {text[pos : end + 1]}")
        self.tokens.append(Token("number", ord(value), pos))
        return end + 1


_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
    "'": "'",
}


def _unquote(body: str, lexer: Lexer, pos: int) -> str:
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        code = body[i + 1 : i + 2]
        if code in _ESCAPES:
            out.append(_ESCAPES[code])
            i += 2
        elif code in ("x", "u", "U"):
            size = {"x": 2, "u": 4, "U": 8}[code]
            digits = body[i + 2 : i + 2 + size]
            if len(digits) != size or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise lexer.error(pos, "invalid syntax in quoted string")
            out.append(chr(int(digits, 16)))
            i += 2 + size
        elif code.isdigit():
            digits = body[i + 1 : i + 4]
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            raise lexer.error(pos, "invalid syntax in quoted string")
    return "".join(out)


def _number(text: str, lexer: Lexer, pos: int) -> int | float:
    clean = text.replace("_", "")
    try:
        if re.fullmatch(r"[+-]?0[xXbBoO].*", clean):
            return int(clean, 0)
        if re.fullmatch(r"[+-]?\d+", clean):
            return int(clean)
        return float(clean)
    except ValueError:
        raise lexer.error(pos, f"bad number syntax: {text!r}") from None


def where(text: str, pos: int) -> str:
    """Go's "line:column" of a position: the column counts the bytes before it on its line."""
    line = text.count("\n", 0, pos) + 1
    column = len(text[text.rfind("\n", 0, pos) + 1 : pos].encode())
    return f"{line}:{column}"
