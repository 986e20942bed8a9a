"""The HTML/SVG report toolkit: escaping by type, tables, embedded images, line plots, bars and histograms."""

from __future__ import annotations

import base64
import html.parser
import io

from PIL import Image

from tessera import report as R


class _Tags(html.parser.HTMLParser):
    """Counts start tags and collects text, failing on nothing: a page must parse."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> _Tags:
    p = _Tags()
    p.feed(page)
    return p


def test_text_is_escaped_and_markup_passes_through():
    e = R.el("p", "a <b> & c", R.el("code", "x<y"), None, title='say "hi"', class_="muted", hidden=True)
    assert str(e) == ('<p title="say &#34;hi&#34;" class="muted" hidden>a &lt;b&gt; &amp; c'
                      '<code>x&lt;y</code></p>')
    page = R.page("T <1>", [R.el("h1", "<script>alert(1)</script>"), R.Markup("<hr>")], css="h1{color:red}")
    assert page.startswith("<!doctype html>") and "<title>T &lt;1&gt;</title>" in page
    assert "<script>" not in page and "<hr>" in page and "h1{color:red}" in page
    assert "".join(parse(page).text).count("<script>alert(1)</script>") == 1  # shown as text, not run


def test_table_formats_floats_and_escapes_cells():
    t = str(R.table(["name", "<v>"], [["a&b", 1 / 3], [R.el("code", "abc"), None], ["n", 7]]))
    assert "<th>&lt;v&gt;</th>" in t and "<td>a&amp;b</td>" in t and "<td>0.333333</td>" in t
    assert "<td><code>abc</code></td><td></td>" in t and "<td>7</td>" in t
    assert parse(t).tags == {"table": 1, "tr": 4, "th": 2, "td": 6, "code": 1}


def test_images_are_embedded_as_png_and_thumbnails_keep_pixels_crisp():
    small = Image.new("RGB", (8, 4), (255, 0, 0))
    small.putpixel((0, 0), (0, 0, 255))
    uri = R.image_data_uri(small, max_size=64)
    assert uri.startswith("data:image/png;base64,")
    thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert thumb.size == (64, 32)  # an integer 8x upscale
    assert thumb.getpixel((7, 7)) == (0, 0, 255) and thumb.getpixel((8, 8)) == (255, 0, 0)  # nearest, no blur
    big = R.image_data_uri(Image.new("RGB", (300, 150)), max_size=100)
    assert Image.open(io.BytesIO(base64.b64decode(big.split(",", 1)[1]))).size == (100, 50)
    assert R.image_data_uri(small) == R.png_data_uri(_png(small))  # no size: the image as it is
    fig = str(R.figure(uri, "step <5>"))
    assert '<img alt="step &lt;5&gt;" src="data:image/png;base64,' in fig and "<figcaption>step &lt;5&gt;" in fig


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_line_plot_drops_missing_points_and_labels_its_axes():
    svg = str(R.line_plot([(10, 3.0), (0, 1.0), (5, float("nan")), (7, None)], title="fid <x>", x_label="step",
                          y_label="FID"))
    tags = parse(svg).tags
    assert tags["svg"] == 1 and tags["circle"] == 2 and tags["polyline"] == 1
    assert "fid &lt;x&gt;" in svg and ">step<" in svg and ">FID<" in svg
    assert "<title>step 0: 1</title>" in svg and "<title>step 10: 3</title>" in svg  # sorted by x, with tooltips
    assert R.line_plot([(1, float("inf"))]) == "" and R.line_plot([]) == ""
    flat = str(R.line_plot([(0, 2.0), (1, 2.0)]))  # a flat series still gets a y range
    assert "nan" not in flat and "inf" not in flat


def test_line_plot_running_mean_and_axis_from_zero():
    pts = [(i * 1000, 10.0 - i * 0.1 + (i % 2)) for i in range(40)]
    svg = str(R.line_plot(pts, smooth=True, markers=False, y_from_zero=True, x_label="samples seen"))
    tags = parse(svg).tags
    assert tags["polyline"] == 2 and "circle" not in tags  # raw + running mean
    assert ">0<" in svg  # the y axis starts at zero
    assert ">39k<" in svg  # compact x ticks
    assert R.running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert R.running_mean([2.0, 4.0], 1) == [2.0, 4.0]


def test_bar_chart_and_histogram():
    bars = str(R.bar_chart([("ingest <ray>", 12.5), ("train", 50.0), ("zero", 0.0)], title="stages", unit="s"))
    assert parse(bars).tags["rect"] == 3 and "ingest &lt;ray&gt;" in bars and ">50s<" in bars
    widths = [float(w.split('"')[0]) for w in bars.split('width="')[2:]]  # skip the <svg> width
    assert widths[1] > widths[0] > widths[2] == 0.0  # proportional to the values
    assert R.bar_chart([]) == ""
    hist = str(R.histogram([0.0, 0.1, 0.2, 0.9, 1.0, float("nan")], bins=2))
    assert "0 to 0.5" in hist and "0.5 to 1" in hist and ">3<" in hist.split("0 to 0.5", 2)[2][:200]
    assert "<title>0.5 to 1: 2</title>" in hist  # the maximum falls in the last bin; NaN is not counted
    assert "<title>5: 3</title>" in str(R.histogram([5, 5, 5], bins=4))  # one distinct value: one bar
    assert R.histogram([float("nan")]) == ""
