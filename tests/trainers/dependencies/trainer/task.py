"""Imports what its package requires beyond the runtime and prints where each module came from."""

import cmlos_helper
import hypertune
import numpy
import pandas


def main() -> None:
    frame = pandas.DataFrame({"x": [1, 2, 3]})
    print(f"pandas {pandas.__version__} from {pandas.__file__}")
    print(f"numpy {numpy.__version__} from {numpy.__file__}")
    print(f"hypertune from {hypertune.__file__}")
    print(f"helper {cmlos_helper.VALUE}, sum {int(frame['x'].sum())}", flush=True)


if __name__ == "__main__":
    main()
