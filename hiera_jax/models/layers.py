"""Hiera's building blocks: patch embedding, mask-unit attention, MLP, stochastic depth, block.

Submodule names mirror the official PyTorch state-dict keys (`attn/qkv`, `mlp/fc1`, `norm1`, ...)
so the checkpoint converter is a rename plus layout transposes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from hiera_jax.models.attention import attention
from hiera_jax.models.kernels import fused_mlp, gpu_norm
from hiera_jax.models.kernels.matmul import Dense

LAYER_NORM_EPS = 1e-6  # official and timm build LayerNorm(eps=1e-6); Flax's default is 1e-5

# Official initialisation. Classification models (`Hiera._init_weights`): trunc_normal(0.02)
# weights, 0.02 biases, LayerNorm (1, 0.02); transformers' is the same with its
# `initializer_range` for 0.02 and `layer_norm_init` for the LayerNorm scale. MAE models
# (`_mae_init_weights`): xavier-uniform weights, zero biases, LayerNorm (1, 0). torch's
# trunc_normal_(std=0.02) cuts at +-2 absolute, i.e. +-100 std, so a plain normal is the same
# distribution.
INIT_STD = 0.02
MAE_KERNEL_INIT = nn.initializers.xavier_uniform()


def dense_inits(
    mae_init: bool,
    weight_init: str = "",
    *,
    mlp: bool = False,
    rescale: float = 1.0,
    std: float = INIT_STD,
) -> dict:
    """Dense initialisers: official classifier (normal `std`, bias `std`), official MAE, or
    timm's `weight_init="jax"`.

    timm's jax init (`init_weight_jax`): xavier-uniform weights, zero biases except the MLP's
    (normal, std 1e-6); its `fix_init_weight` then divides `attn.proj` and `mlp.fc2` weights by
    sqrt(2 · (block index + 1)), passed here as `rescale`.
    """
    if weight_init == "jax":

        def kernel(key, shape, dtype=jnp.float32):
            return MAE_KERNEL_INIT(key, shape, dtype) * jnp.asarray(rescale, dtype)

        bias = nn.initializers.normal(1e-6) if mlp else nn.initializers.zeros
        return dict(kernel_init=kernel, bias_init=bias)
    if mae_init:
        return dict(kernel_init=MAE_KERNEL_INIT, bias_init=nn.initializers.zeros)
    return dict(kernel_init=nn.initializers.normal(std), bias_init=nn.initializers.constant(std))


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with `scale`/`bias` params, statistics in float32.

    The same parameters and math as `nn.LayerNorm` (two-pass variance), written so that XLA CPU
    fuses the affine part into one elementwise pass: `nn.LayerNorm` folds `scale` into the
    per-token rsqrt and XLA then materialises `scale` broadcast to [B, N, C] for every norm.
    `kernel`: "auto" gives 16-bit GPU programs a Triton backward (`kernels.gpu_norm`), "xla"
    keeps XLA's ops everywhere.
    """

    epsilon: float = LAYER_NORM_EPS
    dtype: jnp.dtype = jnp.float32
    bias_init: nn.initializers.Initializer = nn.initializers.zeros
    scale_init: nn.initializers.Initializer = nn.initializers.ones
    kernel: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, with_input: bool = False):
        """norm(x); `with_input`: (x, norm(x)) for a pre-norm block's residual stream, whose
        gradient the GPU backward then adds to dx in the same pass."""
        channels = x.shape[-1]
        scale = self.param("scale", self.scale_init, (channels,))
        bias = self.param("bias", self.bias_init, (channels,))
        return gpu_norm.layer_norm(
            x, scale, bias, self.epsilon, self.dtype, self.kernel, with_input=with_input
        )


def layer_norm(
    name: str,
    zero_bias: bool,
    dtype: jnp.dtype,
    *,
    eps: float = LAYER_NORM_EPS,
    bias: float = INIT_STD,
    scale: float = 1.0,
    kernel: str = "auto",
) -> LayerNorm:
    """A LayerNorm initialised to (`scale`, `bias`), or (`scale`, 0) with `zero_bias` (MAE)."""
    bias_init = nn.initializers.zeros if zero_bias else nn.initializers.constant(bias)
    return LayerNorm(
        epsilon=eps,
        bias_init=bias_init,
        scale_init=nn.initializers.constant(scale),
        dtype=dtype,
        kernel=kernel,
        name=name,
    )


class PatchEmbed(nn.Module):
    """Strided conv over [B, (T), H, W, C] -> tokens [B, N, D] in raster order."""

    dim_out: int
    kernel: Sequence[int]
    stride: Sequence[int]
    padding: Sequence[int]
    mae_init: bool = False
    dtype: jnp.dtype = jnp.float32
    weight_init: str = ""  # "jax": timm's lecun-normal conv, zero bias
    init_std: float = INIT_STD

    @nn.compact
    def __call__(self, x: jnp.ndarray, pixel_mask: jnp.ndarray | None = None) -> jnp.ndarray:
        if pixel_mask is not None:
            # Zero masked pixels before the conv so overlapping kernels cannot leak them.
            x = x * pixel_mask.astype(x.dtype)
        if self.weight_init == "jax":
            kernel_init, bias_init = nn.initializers.lecun_normal(), nn.initializers.zeros
        elif self.mae_init:
            # MAE initialises the patch conv like a Linear: xavier over (k·k·C_in, D).
            kernel_init = nn.initializers.variance_scaling(
                1.0, "fan_avg", "uniform", in_axis=tuple(range(len(self.kernel) + 1)), out_axis=-1
            )
            bias_init = nn.initializers.zeros  # torch default is uniform; MAE never retouches it
        else:
            kernel_init, bias_init = nn.initializers.normal(self.init_std), nn.initializers.zeros
        x = nn.Conv(
            self.dim_out,
            kernel_size=tuple(self.kernel),
            strides=tuple(self.stride),
            padding=[(p, p) for p in self.padding],
            kernel_init=kernel_init,
            bias_init=bias_init,
            dtype=self.dtype,
            name="proj",
        )(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class MaskUnitAttention(nn.Module):
    """Mask-unit (windowed) or global attention with optional query max-pooling.

    Tokens must be unrolled: the window (mask-unit) index is the fastest axis of the sequence,
    and a q-pool is a max over the leading `q_stride` chunk of each window.
    """

    dim_out: int
    heads: int
    q_stride: int = 1  # flattened, e.g. 4 for 2x2
    window_size: int = 0  # flattened mask-unit size after pooling
    use_mask_unit_attn: bool = False
    mae_init: bool = False
    dtype: jnp.dtype = jnp.float32
    weight_init: str = ""
    proj_rescale: float = 1.0  # timm fix_init factor for `proj` (weight_init="jax")
    init_std: float = INIT_STD
    attention_kernel: str = "auto"  # hiera_jax.models.attention: the Pallas kernel on TPU

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, return_attention: bool = False
    ) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
        """[B, N, C] -> [B, N / q_stride, dim_out]; with `return_attention`, also the softmax
        probabilities [B, heads, windows, n_q, n_k] (the Hugging Face `attentions` layout)."""
        num_tokens = x.shape[1]
        head_dim = self.dim_out // self.heads
        num_windows = (
            num_tokens // (self.q_stride * self.window_size) if self.use_mask_unit_attn else 1
        )
        qkv = Dense(
            3 * self.dim_out,
            dtype=self.dtype,
            name="qkv",
            **dense_inits(self.mae_init, self.weight_init, std=self.init_std),
        )(x)
        # hiera_jax.models.attention: straight from the projection's [B, N, 3·C] layout on TPU,
        # through [3, B, windows, heads, n, d] (plain batched GEMMs) on XLA CPU.
        out = attention(
            qkv,
            self.heads,
            num_windows,
            head_dim**-0.5,
            q_stride=self.q_stride,
            kernel=self.attention_kernel,
            return_probs=return_attention,
        )
        if return_attention:
            out, probs = out
        proj_init = dense_inits(
            self.mae_init, self.weight_init, rescale=self.proj_rescale, std=self.init_std
        )
        out = Dense(self.dim_out, dtype=self.dtype, name="proj", **proj_init)(out)
        if return_attention:
            return out, probs.transpose(0, 2, 1, 3, 4)  # [B, w, h, q, k] -> [B, h, w, q, k]
        return out


class DenseParams(nn.Module):
    """`nn.Dense`'s parameters alone (same names, shapes, initialisers and init order, so the
    same values), for layers whose matmul happens elsewhere (the fused MLP kernel)."""

    features: int
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jnp.ndarray, jnp.ndarray]:
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features))
        return kernel, self.param("bias", self.bias_init, (self.features,))


class Mlp(nn.Module):
    """fc1 -> activation (exact GELU in every official model) -> fc2 (timm `Mlp`, no dropout),
    with `nn.Dense`'s parameters and arithmetic (`HieraBlock` may run it in a TPU kernel)."""

    hidden_dim: int
    mae_init: bool = False
    dtype: jnp.dtype = jnp.float32
    weight_init: str = ""
    fc2_rescale: float = 1.0  # timm fix_init factor for `fc2` (weight_init="jax")
    act: str = "gelu"  # a transformers `hidden_act` name (hiera_jax.models.activations)
    init_std: float = INIT_STD

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dim = x.shape[-1]
        std = self.init_std
        fc1 = dense_inits(self.mae_init, self.weight_init, mlp=True, std=std)
        fc2 = dense_inits(
            self.mae_init, self.weight_init, mlp=True, rescale=self.fc2_rescale, std=std
        )
        w1, b1 = DenseParams(self.hidden_dim, name="fc1", **fc1)(dim)
        w2, b2 = DenseParams(dim, name="fc2", **fc2)(self.hidden_dim)
        # Promoted as nn.Dense promotes its input, kernel and bias.
        x, w1, b1, w2, b2 = promote_dtype(x, w1, b1, w2, b2, dtype=self.dtype)
        return fused_mlp.xla_mlp(x, w1, b1, w2, b2, self.act)


class LayerScale(nn.Module):
    """x · gamma with a learned per-channel `gamma` (timm `LayerScale`, `ls1`/`ls2`)."""

    init_values: float

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        gamma = self.param("gamma", nn.initializers.constant(self.init_values), (x.shape[-1],))
        return x * gamma.astype(x.dtype)


class DropPathInputs(NamedTuple):
    """Drop path of a block run under a scan, where the rate is an input, not an attribute.

    keys: [2] the keys the block's `DropPath_0` would draw (attention branch, then MLP branch).
    keep_prob: 1 - rate as float32 (the Bernoulli draw); keep_scale: the same in the compute
    dtype (the rescale). Both are rounded from the Python float, as the static path rounds it.
    """

    keys: jax.Array
    keep_prob: jax.Array
    keep_scale: jax.Array


class DropPath(nn.Module):
    """Per-example stochastic depth (timm `DropPath`, scaled by the keep probability)."""

    rate: float

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, *, train: bool, scanned: tuple[jax.Array, ...] | None = None
    ) -> jnp.ndarray:
        """`scanned` = (key, keep_prob, keep_scale) replaces the rng and `rate` (scanned blocks)."""
        keep, keep_scale = self.draw(x.shape, train=train, scanned=scanned)
        return fused_mlp.drop_path(x, keep, keep_scale)

    def draw(
        self, shape: tuple[int, ...], *, train: bool, scanned: tuple[jax.Array, ...] | None = None
    ) -> tuple[jax.Array | None, float | jax.Array]:
        """(keep [B, 1, ...] bool or None = keep all, keep_scale) for a branch of `shape`."""
        if not train:
            return None, 1.0
        if scanned is None:
            if self.rate == 0.0:
                return None, 1.0
            key, keep_prob, keep_scale = self.make_rng("dropout"), 1.0 - self.rate, 1.0 - self.rate
        else:
            key, keep_prob, keep_scale = scanned
        keep = jax.random.bernoulli(key, keep_prob, (shape[0],) + (1,) * (len(shape) - 1))
        return keep, keep_scale

    def draw_keys(self, count: int = 2) -> jax.Array:
        """[count] keys, the ones `count` calls in training would draw (see `DropPathKeys`)."""
        return jnp.stack([self.make_rng("dropout") for _ in range(count)])


class DropPathKeys(nn.Module):
    """The dropout keys of the block whose name this module takes, drawn outside that block.

    A block draws its two drop-path keys in its `DropPath_0` scope. Built with the block's name
    (`blocks_{i}`), this module reaches the same scope path and so draws the same keys, which a
    scan over blocks then passes in (`DropPathInputs.keys`): scanned and unscanned blocks drop
    the same examples.
    """

    @nn.compact
    def __call__(self) -> jax.Array:
        return DropPath(0.0, name="DropPath_0").draw_keys(2)


class HieraBlock(nn.Module):
    """Pre-norm transformer block; where the width changes, the residual is pool(proj(norm1(x)))."""

    dim_out: int
    heads: int
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    q_stride: int = 1
    window_size: int = 0
    use_mask_unit_attn: bool = False
    mae_init: bool = False
    dtype: jnp.dtype = jnp.float32
    # timm options (the abswin variants); the defaults are the official block.
    init_values: float | None = None  # LayerScale on both branches (`ls1`, `ls2`)
    use_expand_proj: bool = True  # False: widen x to [max-pool(x), avg-pool(x)], no `proj`
    weight_init: str = ""
    init_rescale: float = 1.0  # timm fix_init: attn.proj and mlp.fc2 weights times this
    # transformers' HieraConfig options; the defaults are the official block.
    hidden_act: str = "gelu"
    norm_eps: float = LAYER_NORM_EPS
    init_std: float = INIT_STD  # initializer_range
    norm_scale_init: float = 1.0  # layer_norm_init
    attention_kernel: str = "auto"  # HieraConfig.attention_kernel
    mlp_kernel: str = "auto"  # HieraConfig.mlp_kernel

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        train: bool = False,
        return_attention: bool = False,
        drop_inputs: DropPathInputs | None = None,
    ) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
        """[B, N, dim] -> [B, N / q_stride, dim_out] (and the attention probabilities on request).

        `drop_inputs` replaces the `drop_path` rate and the dropout rng (blocks run under a scan,
        `hiera_jax.models.scan`); None = the attribute's rate and the block's own keys.
        """
        dim = x.shape[-1]
        zero_bias_norms = self.mae_init or self.weight_init == "jax"  # torch LayerNorm (1, 0)
        norm_args = dict(
            eps=self.norm_eps,
            bias=self.init_std,
            scale=self.norm_scale_init,
            kernel=self.mlp_kernel,  # the block's elementwise kernels follow its MLP's switch
        )
        norm1 = layer_norm("norm1", zero_bias_norms, self.dtype, **norm_args)
        if dim == self.dim_out:  # x is the residual stream: its gradient joins norm1's dx
            x, x_norm = norm1(x, with_input=True)
        else:
            x_norm = norm1(x)
        if dim != self.dim_out:
            if self.use_expand_proj:
                proj_init = dense_inits(self.mae_init, self.weight_init, std=self.init_std)
                x = Dense(self.dim_out, dtype=self.dtype, name="proj", **proj_init)(x_norm)
                x = max_pool_unrolled(x, self.q_stride)
            else:
                # timm `use_expand_proj=False`: max- and mean-pool of the un-normed x, concatenated.
                chunks = x.reshape(x.shape[0], self.q_stride, -1, dim)
                x = jnp.concatenate([chunks.max(axis=1), chunks.mean(axis=1)], axis=-1)
        # Named as the auto-name it always had: its scope fixes the keys (see DropPathKeys).
        drop_path_module = DropPath(self.drop_path, name="DropPath_0")
        drop_attn = drop_mlp = None
        if drop_inputs is not None:
            keys, keep_prob, keep_scale = drop_inputs
            drop_attn, drop_mlp = (keys[0], keep_prob, keep_scale), (keys[1], keep_prob, keep_scale)
        if self.init_values is not None:
            ls1 = LayerScale(self.init_values, name="ls1")
            ls2 = LayerScale(self.init_values, name="ls2")
        else:
            ls1 = ls2 = _identity
        attn = MaskUnitAttention(
            self.dim_out,
            self.heads,
            q_stride=self.q_stride,
            window_size=self.window_size,
            use_mask_unit_attn=self.use_mask_unit_attn,
            mae_init=self.mae_init,
            dtype=self.dtype,
            weight_init=self.weight_init,
            proj_rescale=self.init_rescale,
            init_std=self.init_std,
            attention_kernel=self.attention_kernel,
            name="attn",
        )
        attn_probs = None
        if return_attention:
            attn_out, attn_probs = attn(x_norm, return_attention=True)
        else:
            attn_out = attn(x_norm)
        x = x + drop_path_module(ls1(attn_out), train=train, scanned=drop_attn)
        norm2 = layer_norm("norm2", zero_bias_norms, self.dtype, **norm_args)
        keep, keep_scale = drop_path_module.draw(x.shape, train=train, scanned=drop_mlp)
        mlp = Mlp(
            int(self.dim_out * self.mlp_ratio),
            mae_init=self.mae_init,
            dtype=self.dtype,
            weight_init=self.weight_init,
            fc2_rescale=self.init_rescale,
            act=self.hidden_act,
            init_std=self.init_std,
            name="mlp",
        )
        if self.init_values is None and x.ndim == 3 and not self.is_initializing():
            # norm2, the MLP and the residual in one (TPU) kernel: hiera_jax.models.kernels.fused_mlp.
            with jax.named_scope("mlp_half"):  # op_name for profiles (benchmarks/hbm_traffic.py)
                x = fused_mlp.mlp_half(
                    x,
                    self._mlp_half_params(),
                    self.norm_eps,
                    keep,
                    keep_scale,
                    act=self.hidden_act,
                    kernel=self.mlp_kernel,
                )
        else:
            x = x + fused_mlp.drop_path(ls2(mlp(norm2(x))), keep, keep_scale)
        if return_attention:
            return x, attn_probs
        return x

    def _mlp_half_params(self) -> fused_mlp.MlpHalf:
        """norm2's and the MLP's parameters, as `norm2` and `mlp` would use them (init creates
        them through those modules)."""
        params = self.variables["params"]
        norm, fc1, fc2 = params["norm2"], params["mlp"]["fc1"], params["mlp"]["fc2"]
        dense = promote_dtype(
            fc1["kernel"], fc1["bias"], fc2["kernel"], fc2["bias"], dtype=self.dtype
        )
        return fused_mlp.MlpHalf(norm["scale"], norm["bias"], *dense)


def _identity(x: jnp.ndarray) -> jnp.ndarray:
    return x


def max_pool_unrolled(x: jnp.ndarray, stride: int) -> jnp.ndarray:
    """Max over the leading `stride` chunk of unrolled tokens: a 2x2 (or 1x2x2) max-pool."""
    return x.reshape(x.shape[0], stride, -1, x.shape[-1]).max(axis=1)


def head_init(scale: float, weight_init: str = "", std: float = INIT_STD):
    """Classifier init: the official trunc_normal(0.02) weights and 0.02 bias, times `scale`.

    timm's jax init zeroes the classifier (weights and bias) instead.
    """
    if weight_init == "jax":
        return dict(kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)

    def kernel(key, shape, dtype=jnp.float32):
        return nn.initializers.normal(std)(key, shape, dtype) * scale

    def bias(key, shape, dtype=jnp.float32):
        return jnp.full(shape, std * scale, dtype)

    return dict(kernel_init=kernel, bias_init=bias)


def fusion_head_init(kernel: Sequence[int], in_channels: int) -> dict:
    """torch's default Conv init (the MAE fusion heads keep it): U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(in_channels * math.prod(kernel))

    def bias(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return dict(
        kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"), bias_init=bias
    )
