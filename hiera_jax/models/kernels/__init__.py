"""The accelerator kernels under the model's layers, one file per kernel family.

- `tpu`: what the TPU kernels share (kernel names, the VMEM limit, per-device sharding).
- `matmul`: the dense layers' matmul with its own VJP (`Dense`), fewer relayouts on TPU.
- `tpu_attention`: Pallas TPU attention, mask units read in place from the qkv projection.
- `cudnn_attention`: cuDNN's flash attention on NVIDIA GPUs (windows folded into the batch).
- `gpu_attention`: Pallas Triton attention reading the qkv projection in place: power-of-two
  mask units, and one global window of up to 256 tokens.
- `fused_mlp`: each block's second half (norm2, MLP, residual) as one TPU kernel, and its
  dispatch; `gpu_mlp`: the same half as Triton kernels.
- `gpu_norm`: LayerNorm with a Triton backward on NVIDIA GPUs.

The layers pick them (`attention_kernel` / `mlp_kernel` "auto") by the platform a program is
compiled for; `hiera_jax.models.attention` is the attention dispatch.
"""
