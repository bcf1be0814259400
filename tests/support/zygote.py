"""Fresh processes without paying for their imports again and again.

A child process that loads SA3 spends most of its life importing torch, transformers
and upstream (about 9 s of 11 s here, and the suite starts dozens). The zygote
imports them once and forks one child per command it is sent. A forked child is a
new process (its own pid, memory, descriptors and exit status, killable with
SIGKILL) that starts where a user's process stands after its imports: nothing
loaded, no sa3loader state, torch's default generator untouched. It is the same
as ``python -m MODULE ARGS`` except for import-time environment: variables read
while importing (``HF_HOME``, ``OMP_NUM_THREADS``) are the zygote's, so start one
zygote per such environment.

    python -m support.zygote PRELOAD...   (with PYTHONPATH=tests)

PRELOAD is a module to import, or ``module:function`` to import and call (an import
that needs set-up, such as upstream's source put on ``sys.path``).

reads one JSON request per line on stdin and answers each with one line:
``{"start": [module, arg...], "env": {...}, "stdout": path, "stderr": path, "cwd": dir}`` forks a
child that runs ``python -m module arg...`` (or ``python -c CODE`` for ``["-c", CODE]``)
with exactly that environment and its
output in those files, and answers ``{"pid": n}`` at once (children run side by
side); ``{"wait": pid}`` answers ``{"returncode": n}`` when that child has exited
(negative: killed by that signal), as ``subprocess`` reports it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import sys
import threading
import traceback

READY = "zygote ready"


def _run_child(request: dict) -> int:
    """In the forked child: become ``python -m argv[0] argv[1:]``; its exit code."""
    os.environ.clear()
    os.environ.update(request["env"])
    if request.get("cwd"):
        os.chdir(request["cwd"])
    with open(os.devnull, "rb") as devnull:
        os.dup2(devnull.fileno(), 0)  # never the zygote's request stream
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, fd)
        os.close(out)
    module, *args = request["start"]
    try:
        if module == "-c":  # python -c CODE
            sys.argv = ["-c", *args[1:]]
            exec(compile(args[0], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = [module, *args]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as exit_:
        code = exit_.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


def torch_lazy_imports() -> None:
    """A first weight_norm on the meta device imports torch._refs, sympy and more (3 s
    here): done once in the zygote. Nothing runs on the CPU, so no thread pool is forked."""
    import torch

    with torch.device("meta"):
        torch.nn.utils.weight_norm(torch.nn.Linear(2, 2))


def _join_threads() -> None:
    """What the interpreter does at exit, and ``os._exit`` skips: threading's exit hooks
    (concurrent.futures refuses new futures from then on), then wait for every non-daemon
    thread (sa3loader publishes a converted sibling on one). A loop of joins alone missed the
    hooks, and a publication that started a thread pool at exit passed here, failed for users."""
    threading._shutdown()  # type: ignore[attr-defined]  # the interpreter's own step


def _fork(request: dict) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = _run_child(request)
            _join_threads()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)  # never the zygote's atexit handlers or its request loop
    return pid


def serve(preload: list[str]) -> None:
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the answers
        for entry in preload:
            module, _, function = entry.partition(":")
            imported = importlib.import_module(module)
            if function:
                getattr(imported, function)()
    print(READY, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "start" in request:
            reply = {"pid": _fork(request)}
        else:
            _, status = os.waitpid(request["wait"], 0)
            reply = {"returncode": os.waitstatus_to_exitcode(status)}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1:])
