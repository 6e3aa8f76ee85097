"""A small picture in every format of hnq.formats.IMAGE_FORMATS, made here (Pillow writes most of
them; PSD, Sun raster, XPM, FITS, CUR and DCX are put together by hand from their specifications),
for the tests that every listed extension decodes."""
from __future__ import annotations

import io
import struct

from PIL import Image

W, H = 40, 30


def _picture(mode: str = "RGB") -> Image.Image:
    im = Image.new("RGB", (W, H), (200, 40, 90))
    for x in range(W):
        im.putpixel((x, x % H), (10, 220, 30))
    return im if mode == "RGB" else im.convert(mode)


def pil_bytes(fmt: str, mode: str = "RGB", **kw) -> bytes:
    b = io.BytesIO()
    _picture(mode).save(b, fmt, **kw)
    return b.getvalue()


def heic_bytes() -> bytes:
    """A HEIC file written by pillow-heif's Pillow plugin."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    return pil_bytes("HEIF")


def _psd() -> bytes:
    # header (version 1, 3 channels, 8 bits, RGB), empty colour data / resources / layers,
    # then raw (compression 0) planar channels
    head = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, H, W, 8, 3)
    planes = bytes([200]) * (W * H) + bytes([40]) * (W * H) + bytes([90]) * (W * H)
    return head + struct.pack(">I", 0) * 3 + struct.pack(">H", 0) + planes


def _sun() -> bytes:
    head = struct.pack(">8I", 0x59A66A95, W, H, 24, W * H * 3, 1, 0, 0)
    return head + bytes([90, 40, 200]) * (W * H)   # BGR


def _xpm() -> bytes:
    rows = ['"' + "ab" * (W // 2) + '",' for _ in range(H)]
    return ("/* XPM */\nstatic char *x[] = {\n" + f'"{W} {H} 2 1",\n"a c #C82A5A",\n"b c #0ADC1E",\n'
            + "\n".join(rows) + "\n};\n").encode()


def _fits() -> bytes:
    cards = ["SIMPLE  =                    T", "BITPIX  =                    8",
             "NAXIS   =                    2", f"NAXIS1  = {W:20d}", f"NAXIS2  = {H:20d}", "END"]
    head = "".join(c.ljust(80) for c in cards).ljust(2880).encode()
    data = bytes((x * 6) % 256 for x in range(W * H))
    return head + data + bytes(2880 - len(data) % 2880)


def _cur() -> bytes:
    ico = pil_bytes("ICO", sizes=[(16, 16)], bitmap_format="bmp")
    return ico[:2] + struct.pack("<H", 2) + ico[4:]   # type 2: a cursor


def _dcx() -> bytes:
    table = struct.pack("<II", 0x3ADE68B1, 4 + 4 * 1024) + bytes(4 * 1023)
    return table + pil_bytes("PCX")


#: Pillow format -> bytes of a W x H picture in it
MAKERS = {
    "JPEG": lambda: pil_bytes("JPEG"),
    "MPO": lambda: pil_bytes("MPO", save_all=True, append_images=[Image.new("RGB", (W, H))]),
    "PNG": lambda: pil_bytes("PNG"), "WEBP": lambda: pil_bytes("WEBP"), "GIF": lambda: pil_bytes("GIF"),
    "TIFF": lambda: pil_bytes("TIFF"), "BMP": lambda: pil_bytes("BMP"), "DIB": lambda: pil_bytes("DIB"),
    "HEIF": heic_bytes, "AVIF": lambda: pil_bytes("AVIF"), "JPEG2000": lambda: pil_bytes("JPEG2000"),
    "PPM": lambda: pil_bytes("PPM"), "TGA": lambda: pil_bytes("TGA"), "DDS": lambda: pil_bytes("DDS"),
    "ICO": lambda: pil_bytes("ICO"), "CUR": _cur, "ICNS": lambda: pil_bytes("ICNS"),
    "QOI": lambda: pil_bytes("QOI"), "PSD": _psd, "PCX": lambda: pil_bytes("PCX"), "DCX": _dcx,
    "SGI": lambda: pil_bytes("SGI"), "SUN": _sun, "XBM": lambda: pil_bytes("XBM", "1"), "XPM": _xpm,
    "MSP": lambda: pil_bytes("MSP", "1"),
    "BLP": lambda: pil_bytes("BLP", "P"), "FITS": _fits,
}
