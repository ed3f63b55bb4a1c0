"""Federated functions that print the node's data values and fail in the ways a real algorithm does."""

from vfed.algorithms import federated, require_min_rows


@federated()
def convert(df):
    """Print each cell, then fail converting the one that is not a number, quoting it (ValueError)."""
    total = 0.0
    for cell in df["value"]:
        print(f"converting {cell}", flush=True)
        try:
            total += float(cell)
        except ValueError:
            raise ValueError(f"bad value {cell}") from None
    return total


@federated()
def hog(df):
    """Print a cell, then use memory until the container's limit kills it."""
    print(f"first cell {df['value'].iloc[-1]}", flush=True)
    blocks = []
    while True:
        blocks.append(b"\x01" * (16 * 1024 * 1024))


@federated()
def small_group(df):
    """Aggregate over too few records, naming one of them: disclosure control refuses."""
    chosen = df[df["value"] == df["value"].iloc[-1]]
    print(f"group of {chosen['value'].iloc[0]}", flush=True)
    require_min_rows(chosen, f"the rows whose value is {chosen['value'].iloc[0]}")
    return len(chosen)


@federated()
def total(df):
    """Print every cell and complete: a completed run's log is sealed too."""
    for cell in df["value"]:
        print(f"cell {cell}", flush=True)
    return len(df)
