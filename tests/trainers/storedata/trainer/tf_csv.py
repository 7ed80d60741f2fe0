"""TensorFlow: the files by ``tf.io.gfile.glob``, read by ``tf.data.experimental.CsvDataset``."""

from __future__ import annotations

import tensorflow as tf

from trainer.data import matching_files, parse_args, report


def main() -> None:
    args = parse_args()
    files = sorted(path for pattern in args.train_files for path in tf.io.gfile.glob(pattern))
    assert files == matching_files(args.train_files), (files, args.train_files)
    dataset = tf.data.experimental.CsvDataset(files, [tf.float32, tf.float32], header=True)
    rows = sum(1 for _ in dataset)
    batches = dataset.shuffle(rows, seed=0).batch(args.batch_size).repeat(args.epochs)
    slope, intercept = tf.Variable(0.0), tf.Variable(0.0)
    for x, y in batches:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(slope * x + intercept - y))
        d_slope, d_intercept = tape.gradient(loss, [slope, intercept])
        slope.assign_sub(args.learning_rate * d_slope)
        intercept.assign_sub(args.learning_rate * d_intercept)
    report(files, rows, float(slope.numpy()), float(intercept.numpy()))


if __name__ == "__main__":
    main()
