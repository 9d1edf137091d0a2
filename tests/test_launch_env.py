"""`pytest tests` on a GPU machine: every process a CPU-lane test starts sees no GPU.

Without it, a torchrun launch of 4 gloo-layout ranks on a machine with fewer GPUs picks NCCL
and fails in ``set_device(LOCAL_RANK)``, and parity tests meant for the CPU layer run on
whatever GPU is there. tests/gpu asks for the GPUs explicitly (``gpu=True``).
"""

import ast
import glob
import os
import subprocess
import sys

from tests.parallel.launch import REPO, no_visible_gpus, worker_env

#: files that start processes which never touch torch's CUDA, with the reason
EXEMPT = {
    "tests/test_rank_slots.py": "lock-holding helpers, no torch",
    "tests/test_layout.py": "imports modules, runs nothing on a device",
    "tests/test_packaging.py": "builds and inspects the package",
    "tests/test_install.py": "pip itself",
    "tests/test_fake_cuda.py": "the fake-CUDA lane: skipped where a GPU exists",
    "tests/fake_cuda/native.py": "the C++ compiler",
    "tests/test_launch_env.py": "checks the helpers themselves",
}
LAUNCHERS = {("subprocess", "run"), ("subprocess", "Popen"), ("subprocess", "check_output"), ("subprocess", "call"),
             ("subprocess", "check_call"), ("mp", "spawn"), ("multiprocessing", "spawn")}


def _launches(tree):
    """(call node, its enclosing function or the module) for every process launch."""
    scopes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    seen = set()
    for scope in reversed(scopes):  # innermost first
        for node in ast.walk(scope):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and id(node) not in seen:
                owner = node.func.value
                name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", None)
                if (name, node.func.attr) in LAUNCHERS:
                    seen.add(id(node))
                    yield node, scope


def _hides_gpus(call, scope) -> bool:
    """The launch passes an environment made by worker_env() or with CUDA_VISIBLE_DEVICES set."""
    env = next((k.value for k in call.keywords if k.arg == "env"), None)
    if env is None:
        return False
    sources = [ast.unparse(env)]
    if isinstance(env, ast.Name):  # env=env: the assignments to it in the same function
        sources += [ast.unparse(n.value) for n in ast.walk(scope) if isinstance(n, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == env.id for t in n.targets)]
    return any("worker_env(" in s or "CUDA_VISIBLE_DEVICES" in s for s in sources)


def test_every_cpu_lane_launch_hides_the_gpus():
    offenders = []
    files = glob.glob(os.path.join(REPO, "tests", "**", "*.py"), recursive=True)
    for path in sorted(files):
        rel = os.path.relpath(path, REPO)
        if rel.startswith("tests/gpu/") or rel in EXEMPT or rel == "tests/parallel/launch.py":
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        for call, scope in _launches(tree):
            if call.func.attr == "spawn" or not _hides_gpus(call, scope):
                offenders.append(f"{rel}:{call.lineno}: {ast.unparse(call.func)}")
    assert not offenders, ("launches that would see the GPUs (use tests.parallel.launch: torchrun, cpu_spawn, "
                           f"worker_env): {offenders}")


def test_launch_helpers_hide_the_gpus():
    assert worker_env()["CUDA_VISIBLE_DEVICES"] == ""
    assert worker_env(gpu=True).get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
    show = [sys.executable, "-c", "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))"]
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    with no_visible_gpus():  # what cpu_spawn's processes inherit
        assert subprocess.run(show, capture_output=True, text=True).stdout.strip() == "''"
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before  # restored
