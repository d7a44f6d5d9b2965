"""hybrid_fc.runtime: the process plumbing around DeepSpeed (no ranks needed here)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from hybrid_fc import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_an_unresolvable_master_addr_is_named(monkeypatch):
    """Bug caught: `--master_addr node1` on a machine that cannot resolve node1 looped on
    "gai error" for minutes."""
    monkeypatch.setenv("MASTER_ADDR", "no-such-host.invalid")
    with pytest.raises(ValueError, match="MASTER_ADDR='no-such-host.invalid'.*127.0.0.1"):
        runtime.check_master_addr()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    runtime.check_master_addr()


def test_stale_shm_buffers_go_and_mapped_ones_stay(tmp_path):
    """Bug caught: /dev/shm buffers (69 MB of RAM each) left by a run that died during
    start-up, before it could release them, piled up for ever."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this system")
    prefix = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_test{os.getpid()}_"
    stale, live, young = prefix + "1_0", prefix + "2_0", prefix + "3_0"
    for path in (stale, live, young):
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(live, (old, old))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import mmap, sys, time\n"
        f"f = open({live!r}, 'r+b'); m = mmap.mmap(f.fileno(), 4096)\n"
        "print('mapped', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "mapped"
        removed = runtime.remove_stale_shm_buffers()
        assert stale in removed and not os.path.exists(stale)
        assert os.path.exists(live) and os.path.exists(young)   # mapped / a run starting now
    finally:
        holder.kill()
        for path in (stale, live, young):
            if os.path.exists(path):
                os.unlink(path)


def test_preemption_without_a_process_group_is_local():
    with runtime.Preemption() as stop:
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGTERM)   # the handler only sets the flag
        assert stop.agreed() and stop.signal_name == "SIGTERM" and stop.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # the previous handler is back


def test_run_script_statuses(capsys):
    def preempted(argv):
        raise runtime.Preempted("stopped by SIGTERM at step 5; saved x", 143)

    def interrupted(argv):
        raise KeyboardInterrupt

    assert runtime.run_script(preempted) == 143
    assert runtime.run_script(interrupted) == 130
    assert runtime.run_script(lambda argv: 3, status=True) == 3
    assert runtime.run_script(lambda argv: 3) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("stopped by SIGTERM at step 5; saved x")
    assert "interrupted (SIGINT)" in err[1] and len(err) == 2


def test_a_group_left_by_the_script_is_destroyed_at_exit(tmp_path):
    """Bug caught: a script that joined with join_process_group() and ended without
    finish_distributed() left its gloo group to the interpreter's teardown, where a rank could
    die of SIGABRT after its work was done (the README's own-DeepSpeed-model block, once in CI).
    An exit hook registered before joining runs after ours and sees the group gone."""
    seen = tmp_path / "seen"
    script = (
        "import atexit, torch.distributed as dist\n"
        f"atexit.register(lambda: open({str(seen)!r}, 'w').write(str(dist.is_initialized())))\n"
        "from hybrid_fc.runtime import join_process_group\n"
        "rank, world = join_process_group()\n"
        "assert dist.is_initialized() and (rank, world) == (0, 1)\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert seen.read_text() == "False"
