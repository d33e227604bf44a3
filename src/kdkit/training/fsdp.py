"""Sharded training with PyTorch's FSDP2 (``train.strategy: fsdp``) and distributed checkpoints.

Under torchrun with ``strategy: fsdp`` every process holds a 1/N shard of each parameter, gradient and optimiser
state instead of a full copy (DDP's ``strategy: ddp``):

- **What is sharded.** The student per transformer block, then the rest of it as one unit; for Hugging Face
  models the blocks are the modules whose class the model lists in ``_no_split_modules`` (GPT-2's
  ``GPT2Block``, BERT's ``BertLayer``: read from the model, not from a hand list); another model is sharded as
  one unit. The method's own trainable parts (projections, heads) form the root unit. The frozen teacher is
  sharded the same way into its own tree: it holds no optimiser state, runs without gradients and is
  resharded after each forward (``reshard_after_forward``), so a rank holds one block of it at a time beyond
  its shard.
- **Mixed precision.** ``train.precision: bf16`` becomes an FSDP ``MixedPrecisionPolicy``: parameters are
  all-gathered in bfloat16 and gradients reduced in bfloat16, while each rank's shard (the master weights) and
  the optimiser stay float32. ``train.activation_checkpointing: true`` turns on the Hugging Face model's
  gradient checkpointing (other models are refused).
- **Checkpoints** (``torch.distributed.checkpoint``): after each epoch, ``checkpoints/dcp/`` holds the sharded
  method and optimiser state (one file per rank plus DCP's ``.metadata``), ``kdkit.json`` with the epoch, the
  kept epoch and score, the scheduler and the world size, and each rank's RNG state
  (``rng-rank<r>.safetensors``). It is written into a temporary sibling folder and swapped in once every rank
  has finished, so a crash leaves the previous epoch's checkpoint whole. Resuming needs the same world size.
- **Consolidated weights.** ``best.safetensors`` and ``last.safetensors`` are written from the full state dict
  (gathered onto rank 0), as in one process; at the end a Hugging Face student is also written as
  ``model.safetensors`` in a ``save_pretrained`` folder (``checkpoints/pretrained/``) that ``transformers``
  loads. For the report, rank 0 then evaluates unsharded copies of the student and the teacher.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..errors import KdkitError

DCP_DIR = "dcp"
META_FILE = "kdkit.json"


def _dist():
    import torch.distributed as dist

    return dist


def hf_model(model: nn.Module) -> Optional[nn.Module]:
    """The Hugging Face ``PreTrainedModel`` inside ``model`` (kdkit's wrappers keep it as ``.hf``), or None."""
    for m in (model, getattr(model, "hf", None)):
        if m is not None and hasattr(m, "config") and hasattr(m, "_no_split_modules"):
            return m
    return None


def blocks_of(model: nn.Module) -> List[nn.Module]:
    """The transformer blocks of a Hugging Face model (classes named by its ``_no_split_modules``); else []."""
    hf = hf_model(model)
    names = set(getattr(hf, "_no_split_modules", None) or []) if hf is not None else set()
    return [m for m in model.modules() if type(m).__name__ in names]


def sharding_problem(train_cfg, method: nn.Module, world: int) -> Optional[str]:
    """Why this run cannot train with ``strategy: fsdp`` (None if it can); checked before anything is written."""
    if world < 2:
        return ("train.strategy: fsdp shards the models over torchrun's processes, and this run has "
                f"{'one process' if world == 1 else f'{world} processes'}; launch it with torchrun "
                "--nproc_per_node N (N >= 2), or use strategy ddp")
    refusal = getattr(method, "sharding_refusal", None)
    if refusal:
        return f"train.strategy: fsdp: {refusal}"
    student = method.student
    if not any(p.requires_grad for p in student.parameters()):
        return (f"train.strategy: fsdp: the student ({type(student).__name__}) has no trainable torch "
                "parameters to shard; train it in one process")
    if train_cfg.compile:
        return "train.strategy: fsdp with train.compile is not supported; set train.compile: false"
    if train_cfg.teacher_cache in ("memory", "disk"):
        return (f"train.strategy: fsdp runs the sharded teacher live; train.teacher_cache: "
                f"{train_cfg.teacher_cache} is not supported with it (use auto or off)")
    if train_cfg.channels_last:
        return "train.strategy: fsdp with train.channels_last is not supported; set train.channels_last: false"
    if getattr(train_cfg, "activation_checkpointing", False) and hf_model(student) is None:
        return (f"train.activation_checkpointing needs a Hugging Face student (gradient_checkpointing_enable); "
                f"{type(student).__name__} is not one")
    return None


def _meta_copy(model: nn.Module) -> nn.Module:
    """An unsharded copy of ``model`` on the meta device (no memory), to rebuild it after training."""
    clone = copy.deepcopy(model)
    return clone.to("meta")


class Sharded:
    """What :func:`shard` did: the mesh, and meta copies of the student and teacher to rebuild them unsharded."""

    def __init__(self, mesh, student_template: nn.Module, teacher_template: Optional[nn.Module], blocks: int,
                 teacher_blocks: int):
        self.mesh, self.student_template, self.teacher_template = mesh, student_template, teacher_template
        self.blocks, self.teacher_blocks = blocks, teacher_blocks

    def describe(self) -> str:
        ws = self.mesh.size()
        text = (f"FSDP2 over {ws} processes: student in {self.blocks} block(s) + 1 unit"
                if self.blocks else f"FSDP2 over {ws} processes: student as one unit (no transformer blocks found)")
        if self.teacher_template is not None:
            text += f", teacher in {self.teacher_blocks} block(s) + 1 unit, resharded after each forward"
        return text


def shard(method: nn.Module, device: torch.device, train_cfg) -> Sharded:
    """Apply FSDP2 to the method's student (per block), its own parts (the root) and its frozen teacher."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist = _dist()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
          if train_cfg.precision == "bf16" else MixedPrecisionPolicy())
    student = method.student
    if getattr(train_cfg, "activation_checkpointing", False):
        hf_model(student).gradient_checkpointing_enable()
    student_template = _meta_copy(student)
    blocks = _shard_tree(student, mesh, mp, fully_shard)
    fully_shard(method, mesh=mesh, mp_policy=mp)  # the method's own parameters (if any); the root of the step
    teacher = getattr(method, "teacher", None)
    t_model = getattr(teacher, "model", None)
    teacher_template, t_blocks = None, []
    if isinstance(t_model, nn.Module) and any(True for _ in t_model.parameters()):
        teacher_template = _meta_copy(t_model)
        t_blocks = _shard_tree(t_model, mesh, mp, fully_shard)
    return Sharded(mesh, student_template, teacher_template, len(blocks), len(t_blocks))


def _shard_tree(model: nn.Module, mesh, mp, fully_shard) -> List[nn.Module]:
    """Blocks first, then the Hugging Face model inside a kdkit wrapper (generation calls it directly), then
    the model itself; returns the blocks."""
    blocks = blocks_of(model)
    for b in blocks:
        fully_shard(b, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    hf = hf_model(model)
    if hf is not None and hf is not model:
        fully_shard(hf, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    return blocks


# ----------------------------------------------------------------------------- state

def full_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The module's full state dict on rank 0 (CPU), ``{}`` on the other ranks. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(module: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Load a full state dict given on rank 0 into the sharded ``module`` (broadcast). Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def unsharded(template: nn.Module, state: Dict[str, torch.Tensor]) -> nn.Module:
    """A plain copy of a sharded model on the CPU: ``template`` (meta) materialised with the full ``state``."""
    model = copy.deepcopy(template).to_empty(device="cpu")
    model.load_state_dict(state)
    hf = hf_model(model)
    if hf is not None and hasattr(hf, "tie_weights"):
        hf.tie_weights()
    return model


def save_checkpoint(ckpt: Path, method: nn.Module, optimizer, scheduler, extra: Dict[str, Any]) -> None:
    """Write the sharded training state to ``ckpt/dcp`` (all ranks), swapping it in only when complete."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict

    dist = _dist()
    rank, world = dist.get_rank(), dist.get_world_size()
    final, tmp = ckpt / DCP_DIR, ckpt / f".{DCP_DIR}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(method, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    save_file({"torch": torch.get_rng_state()}, str(tmp / f"rng-rank{rank}.safetensors"))
    if rank == 0:
        meta = {"world_size": world, "scheduler": scheduler.state_dict(), **extra}
        (tmp / META_FILE).write_text(json.dumps(meta))
    dist.barrier()
    if rank == 0:
        old = ckpt / f".{DCP_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def checkpoint_world_size(ckpt: Path) -> Optional[int]:
    """The world size a sharded checkpoint was written with (None if there is none)."""
    meta = ckpt / DCP_DIR / META_FILE
    if not meta.is_file():
        return None
    return int(json.loads(meta.read_text())["world_size"])


def load_checkpoint(ckpt: Path, method: nn.Module, optimizer, scheduler) -> Dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote (same world size); returns its extra fields."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    dist = _dist()
    folder = ckpt / DCP_DIR
    meta = json.loads((folder / META_FILE).read_text())
    if meta["world_size"] != dist.get_world_size():
        raise KdkitError(f"cannot resume: the checkpoint in {folder} was written by {meta['world_size']} processes "
                         f"and this run has {dist.get_world_size()}; resume with --nproc_per_node "
                         f"{meta['world_size']}")
    model_sd, optim_sd = get_state_dict(method, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(method, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(load_file(str(folder / f"rng-rank{dist.get_rank()}.safetensors"))["torch"])
    return meta


def save_pretrained(student: nn.Module, folder: Path, tokenizer_path: Optional[str] = None) -> Optional[Path]:
    """Write a Hugging Face student (unsharded, on rank 0) as a ``save_pretrained`` folder; None otherwise."""
    hf = hf_model(student)
    if hf is None:
        return None
    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer_path and Path(tokenizer_path).is_file():
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    return folder


def local_bytes(method: nn.Module, optimizer) -> Dict[str, int]:
    """Bytes this rank holds of the trainable parameters, their gradients and the optimiser state (shards only
    under FSDP: ``DTensor.to_local``)."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    params = [p for p in method.parameters() if p.requires_grad]
    out = {"parameters": sum(local(p).numel() * p.element_size() for p in params),
           "gradients": sum(local(p.grad).numel() * p.grad.element_size() for p in params if p.grad is not None),
           "optimizer": 0}
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.dim() > 0:
                out["optimizer"] += local(v).numel() * v.element_size()
    return out


__all__ = ["Sharded", "blocks_of", "checkpoint_world_size", "full_state", "hf_model", "load_checkpoint",
           "load_full_state", "local_bytes", "save_checkpoint", "save_pretrained", "shard", "sharding_problem",
           "unsharded"]
