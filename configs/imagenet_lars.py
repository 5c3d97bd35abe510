"""Large-batch ImageNet: AlexNet-BN with LARS at global batch 8192.

From You, Gitman and Ginsburg, "Large Batch Training of Convolutional Networks" (2017, arXiv:1708.03888),
section 5 and Table 3(b) "AlexNet-BN with LARS": batch 8K, base learning rate 14, 60.1% top-1, matching their
B=512 baseline (60.2%, LR 2); Figure 2 shows that B=8K run. Their recipe: 100 epochs, SGD momentum 0.9, weight
decay 5e-4, LARS trust coefficient 0.001 at every batch size, polynomial decay with power 2 and 5 warmup epochs
for AlexNet-BN. Here the trust ratio and weight decay skip biases and BatchNorm parameters (see optim.py).

        python -m alexnet_jax.main --config=configs/imagenet_lars.py --workdir=runs/lars \
                --config.data.train_path=/data/imagenet/train --config.data.eval_path=/data/imagenet/val

8192 images must be split over the devices; where they do not fit in memory at once, run each step as k
micro-batches with --config.optim.grad_accum_steps=k (each device's share of the batch must divide by k;
BatchNorm then normalises each micro-batch on its own, as the paper's Caffe iter_size did for 16K and 32K).
"""

from alexnet_jax.config import base_config

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config():
    c = base_config()
    c.model.variant = "bn"
    c.data.source = "imagefolder"
    c.data.image_size = 224
    c.data.resize_size = 256
    c.data.workers = -1  # auto: from the cores and the run's size (none for small runs)
    c.batch_size = 8192
    c.num_epochs = 100
    c.log_every_steps = 20
    c.checkpoint_every_steps = 500
    c.optim.optimizer = "lars"
    c.optim.learning_rate = 14.0  # Table 3(b), B = 8K
    c.optim.lars_trust_coefficient = 0.001
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.weight_decay = 5e-4
    c.optim.schedule = "polynomial"
    c.optim.polynomial_power = 2.0
    c.optim.end_learning_rate_factor = 0.0
    c.optim.warmup_steps = 5 * (IMAGENET_TRAIN_IMAGES // c.batch_size)  # 5 epochs = 780 steps
    # LARS already bounds each kernel's step at learning_rate x trust x its weight norm, and the paper does not
    # clip; the stability guard (non-finite steps, spike rollback) still watches the run.
    c.optim.clip_norm = 0.0
    c.optim.label_smoothing = 0.0  # the paper used none; 0.1 is the common choice where it is wanted
    c.optim.grad_accum_steps = 1
    return c
