"""Fast Mamba selective scan for CPU (and any device without the mamba-ssm CUDA kernels).

Without the kernels, transformers runs Mamba's scan as a Python loop over time steps whose
backward is quadratic in sequence length. This module provides

* :func:`selective_scan` -- a drop-in for ``mamba_ssm``'s ``selective_scan_fn``;
* :func:`enable_fast_mamba` / :func:`disable_fast_mamba` -- patch every ``MambaMixer`` of a
  model (plain or wrapped in a peft ``PeftModel``) to run through it.

On CPU the scan and the causal convolution are fused C loops (``csrc/selective_scan.c``),
compiled on first use and called through ctypes (:mod:`fairforget.mamba_native`); the state stays in
registers and the backward is an explicit reverse-time adjoint recurrence, linear in length.
If the build fails (or ``FAIRFORGET_MAMBA_NATIVE=0``, or the tensors are not on CPU) a
pure-PyTorch implementation with the same semantics and linear-time backward is used.
``FAIRFORGET_FAST_MAMBA=0`` disables the patching altogether.
"""

import functools
import importlib.util
import logging
import os
import types

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN
from transformers.integrations.accelerate import force_accelerate_hooks
from transformers.models.mamba.modeling_mamba import (
    MambaMixer,
    apply_mask_to_padding_states,
    causal_conv1d_fn,
    causal_conv1d_update,
)

from fairforget.mamba_native import MAX_NATIVE_KERNEL, MAX_NATIVE_STATE, native_library

logger = logging.getLogger(__name__)


def _can_use_native(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)


def _seq(t: torch.Tensor | None) -> tuple:
    """(pointer, batch stride, time stride) of a [batch, length, features] tensor with unit inner stride."""
    if t is None:
        return (None, 0, 0)
    return (t.data_ptr(), t.stride(0), t.stride(1))


def _ptr_of(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _unit_inner_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------- scan


class _NativeSelectiveScan(torch.autograd.Function):
    """Fused C scan on channels-last tensors (softplus of delta applied inside when asked)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, initial_state, delta_softplus):
        batch, length, channels = u.shape
        y = u.new_empty(batch, length, channels)
        last_state = u.new_empty(batch, channels, A.shape[1])
        native_library().scan_forward(
            batch, length, channels, A.shape[1], *_seq(u), *_seq(delta), delta_softplus, A.data_ptr(),
            *_seq(B), *_seq(C), _ptr_of(D), *_seq(z), _ptr_of(initial_state), y.data_ptr(),
            last_state.data_ptr(), torch.get_num_threads(),
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, initial_state)
        ctx.delta_softplus = delta_softplus
        ctx.mark_non_differentiable(last_state)
        return y, last_state

    @staticmethod
    def backward(ctx, grad_y, _grad_last_state):
        u, delta, A, B, C, D, z, initial_state = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        batch, length, channels = u.shape
        grad_u, grad_delta = torch.empty_like(grad_y), torch.empty_like(grad_y)
        grad_A, grad_B, grad_C = torch.empty_like(A), u.new_empty(B.shape), u.new_empty(C.shape)
        grad_D = None if D is None else torch.empty_like(D)
        grad_z = None if z is None else torch.empty_like(grad_y)
        grad_initial_state = None if initial_state is None else torch.empty_like(initial_state)
        status = native_library().scan_backward(
            batch, length, channels, A.shape[1], *_seq(u), *_seq(delta), ctx.delta_softplus, A.data_ptr(),
            *_seq(B), *_seq(C), _ptr_of(D), *_seq(z), _ptr_of(initial_state), *_seq(grad_y),
            grad_u.data_ptr(), grad_delta.data_ptr(), grad_A.data_ptr(), grad_B.data_ptr(), grad_C.data_ptr(),
            _ptr_of(grad_D), _ptr_of(grad_z), _ptr_of(grad_initial_state), torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("fairforget: native selective scan backward could not allocate its buffers")
        return grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_initial_state, None


def _torch_selective_scan(u, delta, A, B, C, D, z, initial_state):
    """Pure-PyTorch scan (any device); autograd through a per-step loop, linear in length."""
    decay = torch.exp(delta.unsqueeze(-1) * A)  # [batch, length, channels, state]
    drive = (delta * u).unsqueeze(-1) * B.unsqueeze(2)
    state = initial_state if initial_state is not None else u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    states = []
    # unbind (not indexing) keeps the backward linear: its gradient is a single stack.
    for decay_t, drive_t in zip(decay.unbind(1), drive.unbind(1)):
        state = decay_t * state + drive_t
        states.append(state)
    y = (torch.stack(states, dim=1) @ C.unsqueeze(-1)).squeeze(-1)
    if D is not None:
        y = y + u * D
    if z is not None:
        y = y * F.silu(z)
    return y, state.detach()


def selective_scan_channels_last(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    z: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective scan on channels-last tensors; returns ``(y, last_state)``.

    u, delta, z: [batch, length, channels]; A: [channels, state]; B, C: [batch, length, state];
    D, delta_bias: [channels]; initial_state: [batch, channels, state] (zeros when None).
    The returned last state is detached (it feeds generation caches, not gradients).
    """
    if delta_bias is not None:
        delta = delta + delta_bias
    use_native = (
        _can_use_native(u, delta, A, B, C, D, z, initial_state)
        and A.shape[1] <= MAX_NATIVE_STATE
        and native_library() is not None
    )
    if not use_native:
        delta = F.softplus(delta) if delta_softplus else delta
        return _torch_selective_scan(u, delta, A, B, C, D, z, initial_state)
    u, delta, B, C, z = map(_unit_inner_stride, (u, delta, B, C, z))
    A, D, initial_state = (t if t is None else t.contiguous() for t in (A, D, initial_state))
    return _NativeSelectiveScan.apply(u, delta, A, B, C, D, z, initial_state, delta_softplus)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    z: torch.Tensor | None = None,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
):
    """Drop-in for ``mamba_ssm.selective_scan_fn`` (mamba-ssm layout).

    u, delta, z: [batch, channels, length]; A: [channels, state]; B, C: [batch, state, length];
    D, delta_bias: [channels]. Returns y [batch, channels, length], plus the last state
    [batch, channels, state] when ``return_last_state``.
    """
    transpose = (lambda t: None if t is None else t.transpose(1, 2))
    y, last_state = selective_scan_channels_last(
        transpose(u), transpose(delta), A, transpose(B), transpose(C), D, delta_bias, delta_softplus,
        transpose(z), initial_state,
    )
    y = y.transpose(1, 2)
    return (y, last_state) if return_last_state else y


# ----------------------------------------------------------------------------- causal conv


class _NativeConvSilu(torch.autograd.Function):
    """Fused causal depthwise conv1d + SiLU on channels-last input."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        batch, length, channels = x.shape
        out = x.new_empty(batch, length, channels)
        native_library().conv_silu_forward(
            batch, length, channels, weight.shape[1], *_seq(x), weight.data_ptr(), _ptr_of(bias),
            out.data_ptr(), torch.get_num_threads(),
        )
        ctx.save_for_backward(x, weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        batch, length, channels = x.shape
        grad_out = _unit_inner_stride(grad_out)
        grad_x, grad_weight = x.new_empty(batch, length, channels), torch.empty_like(weight)
        grad_bias = None if bias is None else torch.empty_like(bias)
        native_library().conv_silu_backward(
            batch, length, channels, weight.shape[1], *_seq(x), weight.data_ptr(), _ptr_of(bias),
            *_seq(grad_out), grad_x.data_ptr(), grad_weight.data_ptr(), _ptr_of(grad_bias),
            torch.get_num_threads(),
        )
        return grad_x, grad_weight, grad_bias


def causal_conv1d_channels_last(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None
) -> torch.Tensor:
    """Causal depthwise conv (zero left padding) of x [batch, length, channels] with weight [channels, kernel]."""
    if (
        activation == "silu"
        and _can_use_native(x, weight, bias)
        and weight.shape[1] <= MAX_NATIVE_KERNEL
        and native_library() is not None
    ):
        weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()
        return _NativeConvSilu.apply(_unit_inner_stride(x), weight, bias)
    kernel, length = weight.shape[1], x.shape[1]
    padded = F.pad(x, (0, 0, kernel - 1, 0))
    out = sum(padded[:, k : k + length] * weight[:, k] for k in range(kernel))
    if bias is not None:
        out = out + bias
    return out if activation is None else ACT2FN[activation](out)


# ----------------------------------------------------------------------------- mixer patch


@functools.cache
def mamba_ssm_kernels_available() -> bool:
    return importlib.util.find_spec("mamba_ssm") is not None


def _fast_path_disabled() -> bool:
    return os.environ.get("FAIRFORGET_FAST_MAMBA", "1") == "0"


def _convolve(mixer: MambaMixer, x: torch.Tensor, cache_params, conv_state) -> torch.Tensor:
    """The mixer's causal conv + activation on channels-last x, keeping the cache's conv state."""
    seq_len = x.shape[1]
    weight, bias = mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias
    recording = cache_params is not None and cache_params.is_recording_past(mixer.layer_idx)
    if conv_state is None and not recording:
        if cache_params is not None:
            cache_params.update_conv_state(
                x.transpose(1, 2), mixer.layer_idx, conv_kernel_size=mixer.conv_kernel_size
            )
        return causal_conv1d_channels_last(x, weight, bias, mixer.activation)
    # Continuing a cached sequence: transformers' own path ([batch, channels, length] layout).
    x = x.transpose(1, 2)
    if conv_state is not None and seq_len == 1 and not recording:
        x = causal_conv1d_update(x, conv_state, weight, bias, activation=mixer.activation)
    else:
        x = cache_params.update_conv_state(x, mixer.layer_idx, conv_kernel_size=mixer.conv_kernel_size)
        x = causal_conv1d_fn(x, weight, bias, activation=mixer.activation)[:, :, -seq_len:]
    return x.transpose(1, 2)


def fast_mixer_forward(self: MambaMixer, hidden_states, cache_params=None, attention_mask=None, **kwargs):
    """Replacement ``MambaMixer.forward``: the fast path unless disabled or the CUDA kernels apply."""
    if _fast_path_disabled() or (hidden_states.is_cuda and mamba_ssm_kernels_available()):
        return type(self).forward(self, hidden_states, cache_params, attention_mask, **kwargs)
    return _channels_last_mixer_forward(self, hidden_states, cache_params, attention_mask)


@force_accelerate_hooks(["conv1d"])
def _channels_last_mixer_forward(self: MambaMixer, hidden_states, cache_params, attention_mask):
    """``MambaMixer.forward`` computed channels-last through the fast conv and selective scan."""
    dtype = hidden_states.dtype
    conv_state = recurrent_state = None
    if cache_params is not None:
        conv_state = cache_params.get_conv_state(self.layer_idx)
        recurrent_state = cache_params.get_recurrent_state(self.layer_idx)

    hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
    x, gate = self.in_proj(hidden_states).chunk(2, dim=-1)
    x = apply_mask_to_padding_states(_convolve(self, x, cache_params, conv_state), attention_mask)
    time_step, B, C = torch.split(
        self.x_proj(x), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1
    )
    y, last_state = selective_scan_channels_last(
        x, self.dt_proj(time_step), -torch.exp(self.A_log.float()), B, C, self.D.float(),
        delta_softplus=True, z=gate, initial_state=recurrent_state,
    )
    if cache_params is not None:
        cache_params.update_recurrent_state(last_state, self.layer_idx)
    return self.out_proj(y.to(dtype))


def _mamba_mixers(model: torch.nn.Module) -> list[MambaMixer]:
    return [module for module in model.modules() if isinstance(module, MambaMixer)]


def enable_fast_mamba(model: torch.nn.Module) -> int:
    """Route every ``MambaMixer`` in ``model`` (or a peft wrapper of it) through the fast scan.

    Returns the number of mixers patched; 0 (and a log line) when the model has no Mamba
    mixers, ``FAIRFORGET_FAST_MAMBA=0`` is set, or it runs on CUDA with mamba-ssm installed.
    """
    mixers = _mamba_mixers(model)
    if not mixers:
        logger.info("fast Mamba: no MambaMixer in %s, nothing to patch", type(model).__name__)
        return 0
    if _fast_path_disabled():
        logger.info("fast Mamba: disabled by FAIRFORGET_FAST_MAMBA=0")
        return 0
    on_cuda = any(p.is_cuda for p in model.parameters())
    if on_cuda and mamba_ssm_kernels_available():
        logger.info("fast Mamba: mamba-ssm CUDA kernels are available, keeping transformers' path")
        return 0
    for mixer in mixers:
        mixer.forward = types.MethodType(fast_mixer_forward, mixer)
    backend = "native" if native_library() is not None and not on_cuda else "pytorch"
    logger.info("fast Mamba: patched %d mixers (%s scan)", len(mixers), backend)
    return len(mixers)


def disable_fast_mamba(model: torch.nn.Module) -> int:
    """Restore transformers' forward on every patched mixer; returns how many were restored."""
    restored = 0
    for mixer in _mamba_mixers(model):
        if "forward" in vars(mixer):
            del mixer.forward
            restored += 1
    return restored
