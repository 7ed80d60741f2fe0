"""MXNet: a Gluon ``Dataset`` over the CSV rows, fed by ``gluon.data.DataLoader`` to a ``Dense(1)``."""

from __future__ import annotations

import warnings

warnings.filterwarnings("ignore")

import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402

from trainer.data import matching_files, parse_args, read_rows, report  # noqa: E402


class CsvRows(gluon.data.Dataset):
    def __init__(self, files: list[str]) -> None:
        self.rows = read_rows(files)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        x, y = self.rows[index]
        return mx.nd.array([x]), mx.nd.array([y])


def main() -> None:
    args = parse_args()
    mx.random.seed(0)
    files = matching_files(args.train_files)
    dataset = CsvRows(files)
    loader = gluon.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
    net = gluon.nn.Dense(1, in_units=1)
    net.initialize(mx.init.Zero())
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": args.learning_rate})
    loss_fn = gluon.loss.L2Loss()
    for _ in range(args.epochs):
        for x, y in loader:
            with autograd.record():
                loss = loss_fn(net(x), y)
            loss.backward()
            trainer.step(x.shape[0])
    report(files, len(dataset), float(net.weight.data().asscalar()), float(net.bias.data().asscalar()))


if __name__ == "__main__":
    main()
