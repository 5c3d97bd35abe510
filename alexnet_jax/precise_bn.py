"""BatchNorm statistics that belong to the weights they are used with ("precise BN").

Training keeps BatchNorm's running averages: an exponential average (momentum 0.9, so ~10 steps) of the batch
statistics that *earlier* weights produced. While the weights move quickly (a high learning rate, early
training) those averages lag, and the error compounds through seven BN layers: a model that trains at 0.64 top-1
can evaluate at chance from them. Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021, sec. 3), recompute the
population statistics at the final weights instead; pycls and fvcore call it `update_bn_stats`.

Here, before every eval and every checkpoint save, a forward pass (params untouched, dropout off, BatchNorm
normalising by each batch's own statistics as in training) runs over a fixed set of training examples in the eval
view (pipeline.stats_dataset, read by an iterator of its own, never the training stream), and every BN layer's
input moments are pooled over all of them: mean = E[x], var = E[x^2] - E[x]^2, over every example and position.
The set is whole global batches sharded like a train step, so the result is the same whatever the process count.
The statistics are saved beside the running averages (checkpointing's `bn` item), which training never reads;
evaluate, predict and export use them, and fall back to the running averages where a checkpoint has none.
"""

import functools

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from alexnet_jax import models, sharding
from alexnet_jax.data import pipeline, transforms


def num_examples(config, train_examples: int) -> int:
    """How many examples the statistics pool: `precise_bn_examples`, at most the training set, rounded down to
    whole global batches (a partial batch would be normalised by statistics of fewer examples). 0: off, and
    always 0 for models without BatchNorm."""
    if config.model.variant != "bn":
        return 0
    wanted = min(int(config.get("precise_bn_examples", 0)), train_examples)
    return wanted // config.batch_size * config.batch_size


def _moments_graphdef(model_config):
    """The model in train mode (BatchNorm normalises by the batch) with dropout off and BN momentum 0, so that
    the 'running' statistics a forward pass leaves are exactly this batch's mean and variance."""
    model = nnx.eval_shape(lambda: models.create_model(model_config, rngs=nnx.Rngs(0)))
    model.train()
    model.set_attributes(deterministic=True, momentum=0.0)
    return nnx.graphdef(model)


def batch_moments(params: dict, batch_stats: dict, images: jax.Array, *, graphdef, dtype, image_size: int) -> dict:
    """Per BN layer, this batch's {"mean": E[x], "mean_sq": E[x^2]} (float32), x being the layer's input, over
    the eval view: the central image_size square (the images themselves, or stored pixels at the crop's scale
    under data.device_crops)."""
    model = nnx.merge(graphdef, params, batch_stats)
    model(transforms.normalize(transforms.central_view(images, image_size), dtype))
    stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    return {layer: {"mean": s["mean"], "mean_sq": s["var"] + jnp.square(s["mean"])} for layer, s in stats.items()}


def pooled(moment_sums: dict, batches: int) -> dict:
    """Population statistics from the per-batch moments summed over `batches` equal batches."""
    def layer(s):
        mean = s["mean"] / batches
        return {"mean": mean, "var": jnp.maximum(s["mean_sq"] / batches - jnp.square(mean), 0.0)}

    return {name: layer(s) for name, s in moment_sums.items()}


class PreciseBatchNorm:
    """Computes the statistics for the current weights: `stats = PreciseBatchNorm(...)(params, batch_stats)`.

    The set's grain workers (if any) start once and serve every call; `close()` stops them."""

    def __init__(self, config, train_source, mesh, model_shardings: dict, count: int):
        self.examples = count
        self._mesh = mesh
        ds = pipeline.stats_dataset(
            train_source, num_examples=count, global_batch_size=config.batch_size, seed=config.seed,
            image_size=config.data.image_size, resize_size=config.data.resize_size,
            process_index=jax.process_index(), process_count=jax.process_count(),
            on_device=pipeline.eval_views_on_device(train_source, config.data, "BatchNorm-statistics"))
        feed = pipeline.feed_options(config.data, purpose="the BatchNorm statistics", images=count,
                                     global_batch_size=config.batch_size, process_count=jax.process_count())
        self._passes = pipeline.RepeatedPasses(ds, train_source, kind="stats", **feed)
        moments = functools.partial(batch_moments, graphdef=_moments_graphdef(config.model),
                                        dtype=models.compute_dtype(config.model.dtype),
                                        image_size=int(config.data.image_size))
        self._moments = jax.jit(sharding.with_fc_layout(moments, mesh, config.model.num_classes),
                                in_shardings=(model_shardings["params"], model_shardings["batch_stats"],
                                              sharding.batch_sharding(mesh)),
                                out_shardings=sharding.replicated(mesh))
        # Laid out as the running averages are, so the result drops in wherever they go (eval step, checkpoint).
        self._pooled = jax.jit(pooled, static_argnums=1, out_shardings=model_shardings["batch_stats"])

    def __call__(self, params: dict, batch_stats: dict) -> dict | None:
        """The population statistics at `params` (shaped like `batch_stats`, which only gives the tree its
        shapes), or None with a warning when they are not finite (the caller keeps the running averages)."""
        sums, batches = None, 0
        for local_batch in self._passes():
            images = sharding.host_to_global(local_batch, self._mesh)["image"]
            moments = self._moments(params, batch_stats, images)
            sums = moments if sums is None else jax.tree.map(jnp.add, sums, moments)
            batches += 1
        stats = self._pooled(sums, batches)
        if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(stats)):
            logging.warning("BatchNorm statistics recomputed over %d examples are not finite; evaluating and "
                            "saving with the running averages instead", self.examples)
            return None
        return stats

    def close(self) -> None:
        self._passes.close()
