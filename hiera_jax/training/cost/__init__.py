"""What a step costs and whether it fits, without running it: model FLOPs (`flops`), HBM traffic
read from optimized HLO (`hlo_cost`), the chips' peaks and GPU target descriptions (`chips`), and
the ahead-of-time fit check for TPU and GPU targets (`aot`, `train.py --aot`)."""
