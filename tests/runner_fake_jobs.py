"""Stand-in jobs for the local runner's worker-death tests, and a driver that runs them.

Pool workers are separate (spawned) processes, so a job that kills its worker must be a
function they can import: `fake_execute` takes the place of `hdee.runners.local.execute_job`
(the one internal name these tests patch). Each spec is a JSON file:
{"output_dir": ..., "behaviour": "ok" | "exit" | "sigkill" | "die_once"}; every start
appends a line to OUTPUT_DIR/attempts.

`python -c "import runner_fake_jobs; runner_fake_jobs.main()" WORKERS SPEC[:DEP] ...` runs the
specs as a chain of jobs and prints one JSON line: the finished jobs and the error, if any.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any


def fake_execute(spec_path: str, gpus: int = 0, show_progress: bool = False) -> dict[str, Any]:
    spec = json.loads(Path(spec_path).read_text())
    output = Path(spec["output_dir"])
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "attempts", "a") as attempts:
        attempts.write("start\n")
    starts = len((output / "attempts").read_text().splitlines())
    behaviour = spec["behaviour"]
    if behaviour == "exit" or (behaviour == "die_once" and starts == 1):
        os._exit(3)  # as a crash in native code or the OOM killer would end it: no cleanup
    if behaviour == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    return {"job": output.name, "starts": starts}


def main() -> None:
    from hdee.runners import local

    local.execute_job = fake_execute  # type: ignore[assignment]
    workers = int(sys.argv[1])
    tasks = []
    for argument in sys.argv[2:]:
        spec, _, dependency = argument.partition(":")
        job_id = Path(spec).parent.name
        tasks.append(local.JobTask(job_id, Path(spec), [dependency] if dependency else []))
    finished: list[str] = []
    outcome: dict[str, Any] = {"finished": finished, "error": None}
    try:
        local.run_jobs(tasks, workers=workers, on_done=lambda job_id, _: finished.append(job_id))
    except local.JobFailed as error:
        outcome["error"] = str(error)
    print(json.dumps(outcome))
