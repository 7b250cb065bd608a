"""The input pipeline: sources (folders, TFDS, the embedded digits), augmentation and mixing
(`data`), the host pipeline over a grain-style index (`pipeline`) or tf.data (`tfdata`), and the
global batch each process assembles (`batching`)."""
