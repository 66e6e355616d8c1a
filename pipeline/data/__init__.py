"""The datasets: a source read once into Parquet, arrays per worker, batches by index, transforms on the device.

    source (sources.py) -> Parquet, once (store.py) -> arrays per worker (store.py)
        -> batches by index (store.py) -> normalize, augment on the device (transforms.py)

- `pipeline.data.sources`: a reader per source format (synthetic sets, CSV/Parquet tables, image folders,
  MNIST/FashionMNIST IDX files, CIFAR-10 pickles, torchvision downloads) behind one registry, `SOURCES`.
- `pipeline.data.store`: `materialize` writes a source to Parquet once, with a manifest (`DatasetSpec`);
  workers read it back as arrays (`load_split_rows`) or stream it (`streaming_datasets`), and cut
  batches by index (`batch_indices`, `shard_indices`).
- `pipeline.data.transforms`: `Normalize` and `augment`, batched on the device.

This file imports none of them: importing the store (or serving a model) does not import the readers.
"""
