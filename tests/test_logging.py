"""Library code logs; it never prints unasked. The CLI (and a study worker) shows the package's lines on stderr as
``grokking-tracked: <line>``, redacted."""

import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "grokking_tracked"

# The default echo of a run, its outbox and sync (what reports an outage, a spool kept, a checkpoint skipped), in a
# fresh interpreter as a notebook would import it.
SCRIPT = """
from grokking_tracked.tracking.runs import _stderr_line
{configure}
_stderr_line("the spool at http://alice:s3cret@host:5000 is kept")
"""


def run(configure: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(configure=configure)], capture_output=True,
                          text=True, timeout=120)


def test_a_library_call_prints_nothing_unasked():
    done = run("")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


def test_configured_as_the_cli_does_one_redacted_line_on_stderr():
    done = run("from grokking_tracked.messages import configure_logging\n"
               "from grokking_tracked.tracking.redact import redact\nconfigure_logging(redact)")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["grokking-tracked: the spool at http://alice:***@host:5000 is kept"]


def test_library_modules_do_not_print():
    entry_points = {"cli.py", "workers.py"}  # the CLI and a study worker's entry print their own output
    printing = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                if path.name not in entry_points and "print(" in path.read_text()]
    assert printing == []
