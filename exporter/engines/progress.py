"""Builder progress on stderr: TensorRT's IProgressMonitor phases, else a spinner."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console


@contextlib.contextmanager
def build_progress(trt: Any, title: str, enabled: bool = True) -> Iterator[Any]:
    """Yield a progress monitor for `config.progress_monitor` (None when unsupported)."""
    if not enabled:
        yield None
        return
    console = Console(stderr=True)
    start = time.monotonic()
    with console.status(title) as status:
        monitor_base = getattr(trt, "IProgressMonitor", None)
        yield None if monitor_base is None else _monitor(monitor_base, status, title, start)
    console.print(f"{title}: done in {time.monotonic() - start:.1f} s", highlight=False)


def _monitor(base: type, status: Any, title: str, start: float) -> Any:
    class PhaseMonitor(base):  # type: ignore[misc,valid-type]
        """Shows the innermost running builder phase and its step count."""

        def __init__(self) -> None:
            base.__init__(self)
            self.phases: dict[str, tuple[int, int]] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.phases[phase_name] = (0, num_steps)
            self._show(phase_name)

        def step_complete(self, phase_name: str, step: int) -> bool:
            self.phases[phase_name] = (step + 1, self.phases.get(phase_name, (0, 0))[1])
            self._show(phase_name)
            return True

        def phase_finish(self, phase_name: str) -> None:
            self.phases.pop(phase_name, None)

        def _show(self, phase_name: str) -> None:
            done, total = self.phases.get(phase_name, (0, 0))
            elapsed = time.monotonic() - start
            status.update(f"{title}: {phase_name} ({done}/{total}) {elapsed:.0f} s")

    return PhaseMonitor()
