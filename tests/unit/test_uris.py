from __future__ import annotations

import os

import pytest

from hnq.errors import ErrorCode, ImageError
from hnq.uris import (IMAGE_EXTENSIONS, InvalidURI, file_uri_to_path, is_image_name, parse_http,
                      parse_s3, path_to_file_uri, s3_uri, scheme_of)


@pytest.mark.parametrize("name", ["a.jpg", "A.JPG", "x/y.jpeg", "p.PNG", "w.webp", "g.gif",
                                  "t.tif", "t.TIFF", "b.bmp", "s3://b/k k.Jpg", "i.HEIC", "i.heif",
                                  "a.avif", "j.jfif", "j.JPE", "k.jp2", "k.J2K", "p.pnm", "p.PGM",
                                  "t.tga", "d.dds"])
def test_image_names(name):
    assert is_image_name(name)


@pytest.mark.parametrize("name", ["a.txt", "a", "dir/", ".jpg.bak", "a.jpg/", "jpg", "a.eps", "a.pdf",
                                  "blob", "a.jpg.gz"])
def test_not_image_names(name):
    assert not is_image_name(name)


def test_extensions_set():
    """The listing's extensions are the formats' (hnq.formats; tests/unit/test_formats.py checks
    them against what the decoder opens): the old eight and the new ones."""
    assert {".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp"} < IMAGE_EXTENSIONS
    assert {".heic", ".heif", ".avif", ".jfif", ".jpe", ".jp2", ".j2k", ".pnm", ".ppm", ".pgm", ".pbm",
            ".tga", ".dds"} < IMAGE_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)


@pytest.mark.parametrize("uri,bucket,key", [
    ("s3://bkt/a.jpg", "bkt", "a.jpg"),
    ("s3://bkt/dir/sub/a b.jpg", "bkt", "dir/sub/a b.jpg"),
    ("s3://bkt/100%25 +plus ü.jpg", "bkt", "100%25 +plus ü.jpg"),  # raw key: no decoding
    ("s3://bkt/a?b=c#frag.jpg", "bkt", "a?b=c#frag.jpg"),
    ("s3://my.bucket-1/k", "my.bucket-1", "k"),
    ("S3://bkt/k", "bkt", "k"),
])
def test_parse_s3(uri, bucket, key):
    assert parse_s3(uri) == (bucket, key)
    assert s3_uri(bucket, key) == "s3://" + uri[5:]


@pytest.mark.parametrize("uri", ["s3://", "s3:///x", "s3://bkt", "s3://bkt/", "s3://Bad_Bucket/k",
                                 "s3://ab/k", "s3://-bkt/k", "s3://bkt-/k", "s3://a..b/k", "",
                                 "s3://bkt/a\x00b", "   ", "s3:bkt/k", "http://x/y",
                                 "s3://bkt/" + "k" * 1025])
def test_parse_s3_invalid(uri):
    with pytest.raises(InvalidURI) as ei:
        parse_s3(uri)
    assert isinstance(ei.value, ImageError)
    assert ei.value.code == ErrorCode.invalid_uri


def test_parse_s3_prefix_forms():
    assert parse_s3("s3://bkt", require_key=False) == ("bkt", "")
    assert parse_s3("s3://bkt/", require_key=False) == ("bkt", "")
    assert parse_s3("s3://bkt/a/b/", require_key=False) == ("bkt", "a/b/")
    with pytest.raises(InvalidURI):
        parse_s3("s3:///a/", require_key=False)


@pytest.mark.parametrize("uri,scheme", [
    ("/data/a.jpg", "file"), ("rel/a.jpg", "file"), ("file:///a.jpg", "file"),
    ("file:/a.jpg", "file"), ("s3://b/k", "s3"), ("HTTP://h/x", "http"), ("https://h/x", "https"),
    ("ftp://h/x", "ftp"), ("gs://b/k", "gs"), ("s3:b/k", "s3"),
])
def test_scheme_of(uri, scheme):
    assert scheme_of(uri) == scheme


@pytest.mark.parametrize("name", ["plain.jpg", "with space.jpg", "100%.jpg", "hash#q?.jpg",
                                  "ünïcødé 猫.png", "plus+sign.jpg", "semi;colon.jpg"])
def test_file_uri_round_trip(tmp_path, name):
    p = tmp_path / "d ir" / name
    uri = path_to_file_uri(p)
    assert uri.startswith("file:///")
    assert " " not in uri and "#" not in uri and "?" not in uri
    assert file_uri_to_path(uri) == str(p)


def test_file_uri_non_utf8_bytes(tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/bad\xff.jpg"
    p = os.fsdecode(raw)
    assert os.fsencode(file_uri_to_path(path_to_file_uri(p))) == raw


def test_file_uri_forms():
    assert file_uri_to_path("file:///a/b%20c.jpg") == "/a/b c.jpg"
    assert file_uri_to_path("file://localhost/a.jpg") == "/a.jpg"
    assert file_uri_to_path("file:/a.jpg") == "/a.jpg"
    assert file_uri_to_path("/plain/a%20b.jpg") == "/plain/a%20b.jpg"  # plain paths: verbatim
    for bad in ["file://otherhost/a.jpg", "file:rel.jpg", "file:///a%00b.jpg", ""]:
        with pytest.raises(InvalidURI):
            file_uri_to_path(bad)


def test_parse_http():
    assert parse_http("https://h.example/x?y=1").hostname == "h.example"
    for bad in ["http://", "http:///x", "http://h:99999/", "http://h/a b", "ftp://h/x"]:
        with pytest.raises(InvalidURI):
            parse_http(bad)
