"""Training Conditional DETR, and the data it is trained and evaluated on.

- the loss: `criterion` (set prediction loss) and `matcher` (Hungarian matching), which the models call when they
  are given labels;
- the data: `datasets` (COCO detection / panoptic datasets, batching) and `transforms` (DETR's augmentations);
  `shapes` (the procedural images and videos the bundled model is trained on), `shapes_varied` (their varied
  training look) and `holdout_shapes` (a second renderer, for evaluation only);
- the runs: `train` (`cdetr train`, run configs in `configs/`), `evaluate` (`cdetr eval`) and `random_model`
  (an untrained tiny model for tests, benchmarks and the demo's fallback).

Running a model (its forward pass without labels, the processor, `optimize`, the pipeline's workers) does not
import this package.
"""
