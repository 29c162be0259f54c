"""Read-ahead while converting: a reader thread reads the next step from the file while the current
one converts. The output, its order, errors, cancelling and closing must be what a serial run gives,
with no thread left behind; positional reads let two threads read one open file."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from quant import checkpoint, ltx2, weights
from quant.checkpoint import READER_THREAD, Step, load_converted, plan_conversion, quantize_file
from quant.policies import get_policy
from quant.safetensors_io import CheckpointError, MemoryTensors, SafetensorsFile, TensorSpec, save_tensors

POLICIES = ["fp8-cast", "fp8-scaled-mm", "mxfp8", "nvfp4"]
WAIT_S = 10  # generous: a slow CI machine must not fail a test that waits for the reader


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(READER_THREAD)]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A prefixed single-file tiny LTX-2.3 checkpoint; its last tensor (the vocoder bias) is plain."""
    config = ltx2.tiny_config(num_layers=2)
    state = {ltx2.CHECKPOINT_PREFIX + k: v for k, v in ltx2.synthetic_state_dict(config).items()}
    state["vocoder.conv_post.bias"] = torch.randn(3).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("prefetch") / "in.safetensors"
    save_tensors(path, state, ltx2.header_metadata(config))
    return path


def serial_run(steps: list[Step]) -> list[tuple[str, torch.Tensor]]:
    """What the steps produce without a reader thread: each read and converted in turn."""
    return [(spec.name, tensor) for step in steps for spec, tensor in zip(step.specs, step.make(step.read()))]


def assert_same(got: list[tuple[str, torch.Tensor]], expected: list[tuple[str, torch.Tensor]]) -> None:
    assert [name for name, _ in got] == [name for name, _ in expected]  # same order, same names
    for (name, a), (_, b) in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape and raw_bytes(a) == raw_bytes(b), name


# ---------------------------------------------------------------------------------------------
# Same output, same order
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy_name", POLICIES)
def test_read_ahead_gives_the_serial_output_in_order(model_file, policy_name):
    policy = get_policy(policy_name)
    with SafetensorsFile(model_file) as f:
        expected = serial_run(plan_conversion(f, policy).steps)
        got = list(checkpoint._run_steps(plan_conversion(f, policy).steps, None))
    assert len(got) > 40 and any(t.dtype == torch.float8_e4m3fn or t.dtype == torch.uint8 for _, t in got)
    assert_same(got, expected)


def test_quantize_file_and_load_converted_match_the_serial_output(model_file, tmp_path):
    policy = get_policy("nvfp4")
    with SafetensorsFile(model_file) as f:
        expected = serial_run(plan_conversion(f, policy).steps)
        only_model = serial_run(plan_conversion(f, policy, only_prefix=True).steps)
    dst = tmp_path / "out.safetensors"
    quantize_file(str(model_file), str(dst), policy)
    with SafetensorsFile(dst) as out:
        assert_same([(k, out.read(k)) for k in out.keys()], expected)
    loaded = load_converted(str(model_file), policy)
    model = [(k, v) for k, v in loaded.state_dict.items() if not k.endswith(".comfy_quant")]
    assert_same(model, [(ltx2.strip_prefix(k, ltx2.CHECKPOINT_PREFIX), v) for k, v in only_model])
    assert not reader_threads()


def test_memory_source_converts_like_its_file(model_file):
    policy = get_policy("fp8-scaled-mm")
    with SafetensorsFile(model_file) as f:
        memory = MemoryTensors({k: f.read(k) for k in f.keys()}, f.metadata)
    from_memory = load_converted(memory, policy).state_dict
    from_file = load_converted(str(model_file), policy).state_dict
    assert_same(list(from_memory.items()), list(from_file.items()))


@pytest.mark.parametrize("inference", [False, True])
def test_read_tensors_are_of_the_callers_inference_mode(model_file, inference):
    """Grad and inference modes are per thread: the reader's tensors must be the kind the caller
    would have read itself (ComfyUI runs nodes under inference_mode)."""
    with torch.inference_mode(inference):
        state = load_converted(str(model_file), get_policy("nvfp4")).state_dict
    plain = [t for k, t in state.items() if t.dtype == torch.bfloat16]
    assert plain and all(t.is_inference() == inference for t in plain)


# ---------------------------------------------------------------------------------------------
# Overlap, and no more than one step ahead (fake steps record what ran when)
# ---------------------------------------------------------------------------------------------

class Recorder:
    def __init__(self, count: int, fail_read: int | None = None):
        self.lock = threading.Lock()
        self.reads_started: list[int] = []
        self.read_done = [threading.Event() for _ in range(count)]
        self.fail_read = fail_read
        self.steps = [Step([TensorSpec(f"t{i}", torch.int64, (1,))], lambda i=i: self.read(i),
                           lambda value, i=i: self.make(i, value)) for i in range(count)]

    def read(self, i: int) -> int:
        with self.lock:
            self.reads_started.append(i)
        if i == self.fail_read:
            raise CheckpointError(f"model.safetensors: truncated while reading tensor 't{i}'")
        self.read_done[i].set()
        return i * 10

    def make(self, i: int, value: int) -> list[torch.Tensor]:
        if i + 1 < len(self.steps) and i + 1 != self.fail_read:
            # The next step is read while this one converts: without read-ahead this times out.
            assert self.read_done[i + 1].wait(WAIT_S), f"step {i + 1} was not read while step {i} converted"
        with self.lock:
            assert max(self.reads_started) <= i + 1, f"read {self.reads_started} while step {i} converted"
        return [torch.tensor([value])]


def test_next_step_is_read_while_one_converts_and_no_further():
    recorder = Recorder(6)
    got = list(checkpoint._run_steps(recorder.steps, None))
    assert [(name, int(t)) for name, t in got] == [(f"t{i}", i * 10) for i in range(6)]
    assert recorder.reads_started == list(range(6))
    assert not reader_threads()


def test_read_error_is_raised_at_its_step():
    recorder = Recorder(6, fail_read=3)
    done, got = [], []
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated while reading tensor 't3'"):
        for name, _ in checkpoint._run_steps(recorder.steps, lambda d, total: done.append(d)):
            got.append(name)
    assert got == ["t0", "t1", "t2"] and done == [1, 2, 3]
    assert recorder.reads_started == [0, 1, 2, 3]
    assert not reader_threads()


def test_cancel_in_progress_stops_reading_and_ends_the_thread():
    recorder = Recorder(8)

    def progress(done, total):
        if done == 3:
            raise InterruptedError("cancelled")
    with pytest.raises(InterruptedError):
        list(checkpoint._run_steps(recorder.steps, progress))
    assert recorder.reads_started == [0, 1, 2, 3]  # step 3 was in flight; nothing after
    assert not reader_threads()


def test_consumer_closing_the_generator_ends_the_thread():
    recorder = Recorder(8)
    produced = checkpoint._run_steps(recorder.steps, None)
    assert next(produced)[0] == "t0"
    assert reader_threads()  # reading step 1
    produced.close()
    assert recorder.reads_started == [0, 1]
    assert not reader_threads()


def test_cancelling_quantize_file_removes_the_output_and_ends_the_thread(model_file, tmp_path):
    dst = tmp_path / "out.safetensors"

    def progress(done, total):
        if done == 5:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        quantize_file(str(model_file), str(dst), get_policy("nvfp4"), progress=progress)
    assert not reader_threads()
    assert not dst.exists() and not list(tmp_path.iterdir())


def test_writer_error_ends_the_thread_before_the_error_is_dropped(model_file, tmp_path, monkeypatch):
    """write_streaming abandons the tensors when one is not what it planned; quantize_file closes
    the generator, so the thread ends even while the exception (and its frames) is still held."""
    real_plan = checkpoint.plan_conversion

    def plan_with_a_wrong_tensor(*args, **kwargs):
        conversion = real_plan(*args, **kwargs)
        step = conversion.steps[4]
        step.make = lambda read, make=step.make: [t.reshape(-1)[:1] for t in make(read)]
        return conversion
    monkeypatch.setattr(checkpoint, "plan_conversion", plan_with_a_wrong_tensor)
    dst = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError, match="planned") as exc:
        quantize_file(str(model_file), str(dst), get_policy("nvfp4"))
    assert exc.value.__traceback__ is not None and not reader_threads()
    assert not dst.exists()


def test_truncated_while_loading_names_file_and_tensor(model_file, tmp_path, monkeypatch):
    """The file is cut short after its header was checked (a copy still being written, a failing
    disk): the read of its last tensor fails, at that step, naming the file and the tensor."""
    src = tmp_path / "cut.safetensors"
    src.write_bytes(model_file.read_bytes())
    real_plan = checkpoint.plan_conversion
    plans = []

    def plan_then_cut(f, *args, **kwargs):
        plans.append(real_plan(f, *args, **kwargs))
        os.truncate(src, src.stat().st_size - 1)
        return plans[-1]
    monkeypatch.setattr(checkpoint, "plan_conversion", plan_then_cut)
    done = []
    with pytest.raises(CheckpointError) as exc:
        quantize_file(str(src), str(tmp_path / "out.safetensors"), get_policy("nvfp4"),
                      progress=lambda d, total: done.append(d))
    message = str(exc.value)
    assert str(src) in message and "truncated while reading tensor 'vocoder.conv_post.bias'" in message
    assert "got 5 of 6 bytes" in message
    assert done == list(range(1, len(plans[0].steps)))  # every step before the last one
    assert not reader_threads()


# ---------------------------------------------------------------------------------------------
# Positional reads
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def two_tensor_file(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(256, 1024, generator=g), "b": torch.randint(0, 255, (300, 1001), generator=g,
                                                                         dtype=torch.uint8)}
    path = tmp_path / "two.safetensors"
    save_tensors(path, tensors)
    return path, tensors


def use_read_path(positional: bool, monkeypatch) -> None:
    """Positional reads (os.preadv), or the seek-under-a-lock path of an OS without them (Windows)."""
    if not positional:
        monkeypatch.delattr(os, "preadv", raising=False)
    elif not hasattr(os, "preadv"):
        pytest.skip("this OS has no os.preadv")


class PausingFile:
    """The file object of a SafetensorsFile whose first read waits until released."""

    def __init__(self, file, pause_first):
        self._file, self._pause_first = file, pause_first

    def __getattr__(self, name):
        return getattr(self._file, name)

    def readinto(self, buffer):
        self._pause_first()
        return self._file.readinto(buffer)


@pytest.mark.parametrize("positional", [True, False], ids=["preadv", "seek-under-lock"])
def test_a_read_between_another_threads_seek_and_read_gets_right_bytes(two_tensor_file, positional, monkeypatch):
    """Thread A's read of 'a' stalls (a slow disk) while thread B reads 'b' from the same open file:
    with a shared file position B's seek would move A's read; both must get their own bytes."""
    use_read_path(positional, monkeypatch)
    path, tensors = two_tensor_file
    stalled, release, first = threading.Event(), threading.Event(), [True]

    def pause_first():
        if first:
            first.clear()
            stalled.set()
            release.wait(WAIT_S)
    if positional:
        real_preadv = os.preadv
        monkeypatch.setattr(os, "preadv", lambda *args: (pause_first(), real_preadv(*args))[1])
    got, errors = {}, []

    def read(f: SafetensorsFile, name: str) -> None:
        try:
            got[name] = f.read(name)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)
    with SafetensorsFile(path) as f:
        f._file = PausingFile(f._file, pause_first)
        reader_a = threading.Thread(target=read, args=(f, "a"))
        reader_a.start()
        assert stalled.wait(WAIT_S)
        reader_b = threading.Thread(target=read, args=(f, "b"))
        reader_b.start()
        reader_b.join(0.5)  # B reads now (positional), or waits for A's lock
        release.set()
        reader_a.join()
        reader_b.join()
    assert errors == []
    assert torch.equal(got["a"], tensors["a"]) and torch.equal(got["b"], tensors["b"])


def test_short_positional_reads_are_continued(two_tensor_file, monkeypatch):
    if not hasattr(os, "preadv"):
        pytest.skip("this OS has no os.preadv")
    path, tensors = two_tensor_file
    real, calls = os.preadv, []

    def preadv_at_most_4k(fd, buffers, offset):
        calls.append(offset)
        return real(fd, [memoryview(buffers[0])[:4096]], offset)
    monkeypatch.setattr(os, "preadv", preadv_at_most_4k)
    with SafetensorsFile(path) as f:
        assert torch.equal(f.read("a"), tensors["a"]) and torch.equal(f.read("b"), tensors["b"])
    assert len(calls) >= (256 * 1024 * 4 + 300 * 1001) // 4096


@pytest.mark.parametrize("positional", [True, False], ids=["preadv", "seek-under-lock"])
def test_file_cut_after_opening_names_file_and_tensor(two_tensor_file, positional, monkeypatch):
    use_read_path(positional, monkeypatch)
    path, _ = two_tensor_file
    with SafetensorsFile(path) as f:
        os.truncate(path, path.stat().st_size - 1000)
        assert torch.equal(f.read("a"), two_tensor_file[1]["a"])
        with pytest.raises(CheckpointError) as exc:
            f.read("b")
    assert str(exc.value) == f"{path}: truncated while reading tensor 'b': got {300 * 1001 - 1000} of {300 * 1001} bytes"


# ---------------------------------------------------------------------------------------------
# The deferred NaN/Inf check
# ---------------------------------------------------------------------------------------------

def test_finite_weight_whose_sum_overflows_is_quantized(tmp_path):
    """The NaN/Inf check looks at the sum after quantizing; an overflowing sum of finite values
    must still be counted, found clean, and quantized."""
    config = ltx2.tiny_config(num_layers=1)
    state = ltx2.synthetic_state_dict(config, dtype=torch.float32)
    layer = "transformer_blocks.0.ff.net.2"
    state[layer + ".weight"] = torch.full_like(state[layer + ".weight"], 3e38)
    src = tmp_path / "huge.safetensors"
    save_tensors(src, state, ltx2.header_metadata(config))
    with SafetensorsFile(src) as f:
        info = checkpoint.inspect_checkpoint(f)
        qw = checkpoint.convert_layer(f, info.layers[layer], weights.FP8_TENSOR)
    assert torch.isfinite(qw.dequantize()).all()
    assert torch.allclose(qw.dequantize(), state[layer + ".weight"], rtol=0.07)
