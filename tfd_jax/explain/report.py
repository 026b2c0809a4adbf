"""What ``explain`` found: one result per worked example, the walkthrough's numbers, and the errata."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tfd_jax.explain.compare import AGREES, CARRIED, DIFFERS, UNCHECKED, Check, Value, compare, to_jsonable
from tfd_jax.explain.examples import compute


@dataclass
class ExampleResult:
    """One worked example: our numbers, the course's, and the verdict.

    Attributes:
      agrees_with_course: True when every printed number we can recompute agrees (directly or via
        the course's own rounded intermediates), False when at least one is a course error, None
        when nothing is checkable.
      recorded_agrees: the verdict stored in ``worked_examples.json``, for cross-checking.
      ours / course: ``{output name: value}``; ours only holds what could be computed.
      checks: every printed number with its status (see :mod:`tfd_jax.explain.compare`).
    """

    id: str
    chapter: int
    title: str
    lines: list[int]
    agrees_with_course: bool | None
    recorded_agrees: bool | None
    ours: dict[str, Any]
    course: dict[str, Any]
    checks: list[Check]
    why: str = ""
    info: list[str] = field(default_factory=list)
    not_checkable: str = ""
    notes: dict[str, str] = field(default_factory=dict)  # how each output was computed

    @property
    def errors(self) -> list[Check]:
        """The printed numbers that are wrong, and those that only follow from them."""
        if self.agrees_with_course is not False:
            return []
        return [c for c in self.checks if c.status in (DIFFERS, CARRIED)]

    @property
    def unchecked(self) -> list[Check]:
        return [c for c in self.checks if c.status == UNCHECKED]

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "chapter": self.chapter,
            "title": self.title,
            "lines": self.lines,
            "agrees_with_course": self.agrees_with_course,
            "recorded_agrees": self.recorded_agrees,
            "ours": to_jsonable(self.ours),
            "course": to_jsonable(self.course),
            "checks": [c.to_dict() for c in self.checks],
            "why": self.why,
            "info": self.info,
            "not_checkable": self.not_checkable,
            "notes": self.notes,
        }


@dataclass
class Step:
    """One line of the "I love pizza" walkthrough."""

    chapter: int
    name: str
    label: str
    ours: Any
    course: Any = None
    status: str = ""  # agrees / carried / differs / "" (nothing printed by the course)
    note: str = ""


@dataclass
class Report:
    """Everything ``explain`` computed (also what ``--json`` prints)."""

    examples: list[ExampleResult] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    walkthrough: dict[str, Any] = field(default_factory=dict)  # key numbers by name

    @property
    def reproduced(self) -> list[ExampleResult]:
        return [e for e in self.examples if e.agrees_with_course is True]

    @property
    def errata(self) -> list[ExampleResult]:
        return [e for e in self.examples if e.agrees_with_course is False]

    @property
    def not_checkable(self) -> list[ExampleResult]:
        return [e for e in self.examples if e.agrees_with_course is None]

    @property
    def verdicts_match_record(self) -> bool:
        """True when every verdict equals the one recorded in the shipped data."""
        return all(e.agrees_with_course == e.recorded_agrees for e in self.examples)

    def example(self, example_id: str) -> ExampleResult:
        for e in self.examples:
            if e.id == example_id:
                return e
        raise KeyError(example_id)

    def to_dict(self) -> dict:
        return {
            "summary": {
                "examples": len(self.examples),
                "reproduced": len(self.reproduced),
                "course_errors": len(self.errata),
                "not_checkable": len(self.not_checkable),
                "verdicts_match_record": self.verdicts_match_record,
            },
            "walkthrough": [
                {
                    "chapter": s.chapter,
                    "name": s.name,
                    "label": s.label,
                    "ours": to_jsonable(s.ours),
                    "course": to_jsonable(s.course),
                    "status": s.status,
                    "note": s.note,
                }
                for s in self.steps
            ],
            "examples": [e.to_dict() for e in self.examples],
            "errata": [
                {
                    "id": e.id,
                    "title": e.title,
                    "why": e.why,
                    "entries": [
                        {
                            "path": c.path,
                            "course": to_jsonable(c.course),
                            "correct": to_jsonable(c.ours),
                            "follows_from_earlier_error": c.status == CARRIED,
                        }
                        for c in e.errors
                    ],
                }
                for e in self.errata
            ],
        }


def check_example(example: dict, data: dict) -> ExampleResult:
    """Recompute one worked example from its inputs and judge each printed output."""
    calc = compute(example, data)
    course = example["course_outputs"]
    checks: list[Check] = []
    ours: dict[str, Any] = {}
    for key, printed in course.items():
        spec = calc.values.get(key)
        if spec is None:
            reason = calc.not_checkable or "not computable from the printed inputs"
            checks += compare(key, printed, _unchecked(reason))
            continue
        if spec.ours is not None:
            ours[key] = spec.ours
        checks += compare(key, printed, spec)
    statuses = {c.status for c in checks}
    if calc.not_checkable or statuses <= {UNCHECKED}:
        verdict = None
    else:
        verdict = DIFFERS not in statuses
    return ExampleResult(
        id=example["id"],
        chapter=example["chapter"],
        title=example["title"],
        lines=example.get("lines", []),
        agrees_with_course=verdict,
        recorded_agrees=example.get("agrees"),
        ours=ours,
        course=course,
        checks=checks,
        why=calc.why,
        info=calc.info,
        not_checkable=calc.not_checkable,
        notes={k: v.note for k, v in calc.values.items() if v.note and k in course},
    )


def _unchecked(reason: str) -> Value:
    return Value(None, unchecked=reason)


__all__ = ["AGREES", "CARRIED", "DIFFERS", "UNCHECKED", "ExampleResult", "Report", "Step", "check_example"]
