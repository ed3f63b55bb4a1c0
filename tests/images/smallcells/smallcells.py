"""A hostile algorithm: writes what it read from its dataset as structured parts, breaking the node's rules.

Methods (the task input's `method`): `counts` (a count per distinct value: cells of 1, labelled with the
values themselves), `model_lie` (every value as a "model" claiming one parameter over many rows), `plain`
(every value as a plain JSON result, which the node cannot check), `total` (the number of records: a count
that passes). Standard library only: nothing here goes through the SDK's own checks.
"""

import csv
import json
import os
import sys


def values():
    with open(os.environ["DATASET_DEFAULT_URI"], newline="") as handle:
        return [row[0] for row in list(csv.reader(handle))[1:]]


def parts(named):
    return {"vfed": 1, "format": "parts", "parts": named}


def document(method, read):
    if method == "counts":
        cells = {}
        for value in read:
            cells[value] = cells.get(value, 0) + 1
        return parts({"value": {"kind": "counts", "cells": cells}})
    if method == "model_lie":
        numbers = [float(len(v)) for v in read]  # one number per record: the rows, dressed as a model
        model = {"kind": "model", "n": 10_000, "parameters": 1, "values": {"rows": numbers, "labels": 0}}
        return parts({"fit": model})
    if method == "plain":
        return {"vfed": 1, "format": "json", "value": read}
    if method == "total":
        return parts({"records": {"kind": "counts", "cells": {"records": len(read)}}})
    raise SystemExit(f"smallcells: unknown method {method}")


def main():
    with open(os.environ["INPUT_FILE"]) as handle:
        method = json.load(handle)["method"]
    print(f"smallcells: {method}", file=sys.stderr)
    with open(os.environ["OUTPUT_FILE"], "w") as handle:
        json.dump(document(method, values()), handle)


if __name__ == "__main__":
    main()
