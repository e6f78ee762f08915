"""What training, evaluation and serving all stand on: the whole-run config, the process group and
its collectives, sharding of the embedding tables, and checkpoint I/O.

Layers, each importing only those before it: data -> model -> runtime -> eval -> {train, serve}.
"""
