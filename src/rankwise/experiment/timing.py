"""Side-by-side timing of training steps: the primitives of ``rankwise bench`` and ``benchmarks/``.

Every published figure is a *ratio* between candidates timed in one process, interleaved round by
round after warm-up and reduced to the median (the machines are shared, so absolute times mean
little). The reference is the **frozen floor**: the same model's forward + backward to its input
embeddings with no trainable weight, the least any adapter's training step can cost. Peak memory is the
growth of the resident set's high-water mark from a reset (:func:`reset_peak_rss`, :func:`peak_rss_growth`;
Linux), shared by ``benchmarks/`` and ``rankwise compare``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

Step = Callable[[], None]
Batch = dict[str, Tensor]


def random_batch(model: nn.Module, batch: int, seq: int, seed: int = 0) -> Batch:
    """Token ids drawn uniformly from the model's vocabulary, with a full attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def scalar_loss(hidden: Tensor) -> Tensor:
    """The benchmark's loss: mean square of the last hidden state (any scalar would do)."""
    return hidden.float().square().mean()


def training_step(
    model: nn.Module, batch: Batch, lr: float = 1e-4, optimizer: torch.optim.Optimizer | None = None
) -> Step:
    """One optimiser step of ``model``'s trainable parameters: forward, loss, backward, step, zero_grad.

    The optimiser is AdamW(lr) over the trainable parameters unless ``optimizer`` is given.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to step")
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=lr)

    def step() -> None:
        scalar_loss(model(**batch).last_hidden_state).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def floor_step(model: nn.Module, batch: Batch) -> Step:
    """The frozen floor: forward + backward to the input embeddings, no trainable weight."""
    model.requires_grad_(False)
    embed = model.get_input_embeddings()

    def step() -> None:
        inputs = embed(batch["input_ids"]).detach().requires_grad_(True)
        scalar_loss(model(inputs_embeds=inputs, attention_mask=batch["attention_mask"]).last_hidden_state).backward()

    return step


def inference_step(model: nn.Module, batch: Batch) -> Step:
    """One eval-mode forward without autograd."""
    model.eval()

    def step() -> None:
        with torch.inference_mode():
            model(**batch)

    return step


def interleaved_times(steps: dict[str, Step], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of every step, run round by round (each round calls every step once).

    The ``warmup`` first rounds are run and discarded; the order inside a round rotates so that no
    candidate always runs right after the same neighbour.
    """
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    """The median of every candidate's samples."""
    return {name: statistics.median(samples) for name, samples in times.items()}


def _proc_bytes(path: str, field: str) -> int | None:
    """A ``FIELD: N kB`` line of a Linux ``/proc`` file in bytes; None where there is no such file or line."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":")), None)


def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` memory line (``VmRSS``, ``VmHWM``) in bytes; None where there is no such file."""
    return _proc_bytes("/proc/self/status", field)


def reset_peak_rss() -> int | None:
    """Reset this process's resident-set high-water mark (``VmHWM``) to its current size and return that size
    (Linux only: writing 5 to ``/proc/self/clear_refs``; None elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def peak_rss_growth(before: int | None) -> int | None:
    """Bytes by which the resident set's high-water mark rose above ``before`` (from :func:`reset_peak_rss`)."""
    peak = _status_bytes("VmHWM") if before is not None else None
    return None if peak is None or before is None else peak - before


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a new allocation on ``device``: the GPU's free memory, or on CPU the kernel's
    ``MemAvailable`` (Linux; None elsewhere or for other devices)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _proc_bytes("/proc/meminfo", "MemAvailable") if device.type == "cpu" else None
