"""PyTorch: a ``torch.utils.data.Dataset`` over the CSV rows, fed by a ``DataLoader`` to ``nn.Linear(1, 1)``."""

from __future__ import annotations

import torch

from trainer.data import matching_files, parse_args, read_rows, report


class CsvRows(torch.utils.data.Dataset):
    def __init__(self, files: list[str]) -> None:
        self.rows = torch.tensor(read_rows(files))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return self.rows[index, :1], self.rows[index, 1:]


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    files = matching_files(args.train_files)
    dataset = CsvRows(files)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate)
    for _ in range(args.epochs):
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    report(files, len(dataset), model.weight.item(), model.bias.item())


if __name__ == "__main__":
    main()
