"""tables.format_table, the one formatter behind the CLI's tables: columns as wide as their widest
cell, per-column alignment, an optional rule, and a header alone when there are no rows."""

from tvm_patdnn.tables import format_table


def test_columns_are_as_wide_as_their_widest_cell_and_aligned_per_column():
    text = format_table(("kernel", "ms"), [("conv2d_0", "1.5"), ("fc", "12.25")], align="<>", rule=True)
    assert text.splitlines() == ["kernel       ms", "--------  -----", "conv2d_0    1.5", "fc        12.25"]


def test_an_empty_table_is_its_header():
    assert format_table(("layer", "verdict"), []) == "layer  verdict"
