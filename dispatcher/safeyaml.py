"""YAML for operator files (campaigns, gateway configs): no aliases, bounded nesting, positions kept.

Campaign files and gateway configs are short, hand-written and often copied from
elsewhere, so three things a YAML parser allows are refused before any value is
built, each as a ``MarkedYAMLError`` pointing at its line:

- aliases and anchors (``&a`` / ``*a``): a 400-byte file of nested aliases (the
  "billion laughs") expands to gigabytes once constructed, and nothing an operator
  writes here needs them;
- nesting deeper than ``MAX_DEPTH``: the composer and everything that walks the
  result recurse, so ``[[[[...`` five thousand deep would end in a RecursionError;
- characters YAML itself forbids (a NUL byte in the file): reported with a line,
  not only a byte offset.

JSON is YAML, so a JSON config goes through the same checks.
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import InputError

#: deeper than any campaign or gateway config needs (they use four or five levels)
MAX_DEPTH = 32


class UnsafeYAMLError(yaml.MarkedYAMLError):
    """A document this loader refuses; ``field`` is the dotted path of the node where it was found."""

    def __init__(self, problem: str, mark: Any, field: str | None = None) -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.field = field


class _Loader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        #: the keys and indexes leading to the node being composed (None for a mapping key or the root)
        self._path: list[Any] = []

    def _field(self) -> str | None:
        parts = [str(p) for p in self._path if p is not None]
        if len(parts) > 6:
            parts = [*parts[:6], "…"]
        return ".".join(parts) or None

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if isinstance(index, yaml.ScalarNode):
            label: Any = index.value  # the value of a mapping key
        elif isinstance(index, int):
            label = index  # an item of a sequence
        else:
            label = None
        self._path.append(label)
        try:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                raise UnsafeYAMLError(
                    f"YAML aliases (*{event.anchor}) are not allowed here; write the value out",
                    event.start_mark,
                    self._field(),
                )
            if getattr(event, "anchor", None) is not None:
                raise UnsafeYAMLError(
                    f"YAML anchors (&{event.anchor}) are not allowed here; write the value out",
                    event.start_mark,
                    self._field(),
                )
            if len(self._path) > MAX_DEPTH:
                raise UnsafeYAMLError(f"nested deeper than {MAX_DEPTH} levels", event.start_mark, self._field())
            node: yaml.Node | None = super().compose_node(parent, index)
        finally:
            self._path.pop()
        return node


def load(text: str, name: str = "<file>") -> tuple[yaml.Node | None, Any]:
    """The document's node tree (for line numbers) and its plain data, composed once.

    Raises ``yaml.YAMLError`` (a ``MarkedYAMLError`` with a line for everything this
    module refuses); ``load_or_fail`` turns those into one-line input errors.
    """
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:  # the reader checks every character up front
        position = exc.position
        line = text.count("\n", 0, position)
        column = position - (text.rfind("\n", 0, position) + 1)
        char = exc.character if isinstance(exc.character, int) else 0
        mark = yaml.Mark(name, position, line, column, None, None)  # type: ignore[arg-type]  # no snippet
        raise UnsafeYAMLError(f"character U+{char:04X} is not allowed in YAML ({exc.reason})", mark) from exc
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return node, data


def positions(node: yaml.Node) -> dict[tuple[Any, ...], tuple[int, int]]:
    """(line, column), 1-based, of every field and item, keyed by its path (``("districts", 0, "id")``).

    A mapping's field points at its key, which is where an operator looks.
    """
    marks: dict[tuple[Any, ...], tuple[int, int]] = {}

    def walk(item: yaml.Node, path: tuple[Any, ...]) -> None:
        marks[path] = (item.start_mark.line + 1, item.start_mark.column + 1)
        if isinstance(item, yaml.MappingNode):
            for key_node, value_node in item.value:
                walk(value_node, (*path, key_node.value))
                marks[(*path, key_node.value)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        elif isinstance(item, yaml.SequenceNode):
            for index, child in enumerate(item.value):
                walk(child, (*path, index))

    walk(node, ())
    return marks


def load_or_fail(
    text: str, name: str, error: type[InputError], what: str = "invalid YAML"
) -> tuple[yaml.Node | None, Any]:
    """``load``, with any YAML problem raised as one located ``error`` (``name:line:column: field: …``).

    An unclosed bracket is reported where it was opened, not at the end of the file where
    the parser noticed it.
    """
    try:
        return load(text, name)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if exc.context_mark is not None and exc.problem and "<stream end>" in exc.problem:
            mark = exc.context_mark
        raise error(
            f"{what}: {exc.problem or exc.context or 'invalid YAML'}",
            path=name,
            line=mark.line + 1 if mark else None,
            column=mark.column + 1 if mark else None,
            field=getattr(exc, "field", None),
        ) from exc
    except yaml.YAMLError as exc:
        raise error(f"{what}: {exc}", path=name) from exc
