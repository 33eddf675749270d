"""Name -> function tables for the pieces a config chooses by name: losses,
rewards and advantage estimators share this one helper."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterator, Mapping


class Registry:
  """Functions registered under names, e.g. `LOSSES = Registry("loss")`.

  @LOSSES.register("sft")
  def next_token_cross_entropy(...): ...

  LOSSES.get("sft")   # KeyError naming the registered ones if unknown
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._items: dict[str, Callable[..., Any]] = {}

  def register(self, name: str) -> Callable[[Callable], Callable]:
    """A decorator that adds its function under `name` (once)."""

    def wrap(fn: Callable) -> Callable:
      if name in self._items:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._items[name] = fn
      return fn

    return wrap

  def get(self, name: str) -> Callable[..., Any]:
    try:
      return self._items[name]
    except KeyError:
      raise KeyError(
          f"unknown {self.kind} {name!r}; registered: " f"{sorted(self._items)}"
      ) from None

  def check(self, names, field: str) -> None:
    """Raises ValueError naming `field` when a name is not registered."""
    unknown = sorted(set(names) - set(self._items))
    if unknown:
      raise ValueError(
          f"{field}: unknown {self.kind}(s) {unknown}; "
          f"registered: {sorted(self._items)}"
      )

  def names(self) -> list[str]:
    return sorted(self._items)

  def __contains__(self, name: str) -> bool:
    return name in self._items

  def __iter__(self) -> Iterator[str]:
    return iter(sorted(self._items))


def call_with(fn: Callable, available: Mapping[str, Any], what: str) -> Any:
  """Calls `fn` with the entries of `available` its signature names.

  A registered function says what it needs through its parameter names
  (e.g. `logits`, `queries`, `tau`), so a caller can run any of them from
  one table of inputs and settings.

  Raises:
    ValueError: `fn` needs an argument that `available` does not hold.
  """
  kwargs = {}
  for name, p in inspect.signature(fn).parameters.items():
    if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
      continue
    if name in available:
      kwargs[name] = available[name]
    elif p.default is p.empty:
      raise ValueError(
          f"{what} needs {name!r}, which this stage does not "
          f"provide (it provides {sorted(available)})"
      )
  return fn(**kwargs)


def parameters(fn: Callable) -> set[str]:
  """The argument names of `fn` (what it needs from `call_with`)."""
  return {
      n
      for n, p in inspect.signature(fn).parameters.items()
      if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
  }
