"""factory.media.probe on real media built here with PyAV, numpy and Pillow (nothing downloaded).

The builders (`make_sine_audio`, `make_color_video`, `make_png`) are plain functions other tests may import.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import av
import numpy as np
import pytest
from PIL import Image

from factory.media.probe import (
    EVALUATOR_MAX_BYTES,
    EVALUATOR_MAX_SIDE,
    SILENCE_DBFS,
    MediaFacts,
    UnreadableMedia,
    evaluator_image,
    facts_text,
    probe,
    sample_frames,
)

pytestmark = pytest.mark.fast

RGB = tuple[int, int, int]
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
AUDIO_CODECS = {"wav": "pcm_s16le", "mp3": "libmp3lame", "mp4": "aac", "webm": "libopus"}
VIDEO_CODECS = {"mp4": "libx264", "webm": "libvpx-vp9"}


def sine_dbfs(amplitudes: Sequence[float]) -> float:
    """The RMS level of equal-length sines, one per channel, pooled: a sine's RMS is its amplitude / sqrt(2)."""
    return 10 * math.log10(sum(a * a / 2 for a in amplitudes) / len(amplitudes))


def _add_audio(container: av.container.OutputContainer, codec: str, rate: int, channels: int) -> av.AudioStream:
    return container.add_stream(codec, rate=rate, layout="mono" if channels == 1 else "stereo")


def _write_sine(container: av.container.OutputContainer, stream: av.AudioStream, seconds: float,
                amplitudes: Sequence[float]) -> None:
    rate = stream.rate
    t = np.arange(round(seconds * rate)) / rate
    pcm = np.stack([a * np.sin(2 * np.pi * 440 * t) for a in amplitudes]).astype(np.float32)
    for start in range(0, pcm.shape[1], 1024):  # PyAV re-chunks and converts to what the encoder takes
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, start:start + 1024]), format="fltp",
                                           layout=stream.layout.name)
        frame.rate, frame.pts = rate, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def make_sine_audio(seconds: float = 2.0, amplitudes: Sequence[float] = (0.5,), fmt: str = "wav",
                    rate: int = 44100) -> bytes:
    """A 440 Hz sine, one channel per amplitude (0.0 gives a silent channel), as WAV (16-bit PCM) or MP3."""
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        _write_sine(container, _add_audio(container, AUDIO_CODECS[fmt], rate, len(amplitudes)), seconds, amplitudes)
    return out.getvalue()


def make_color_video(colors: Sequence[RGB] = (RED, GREEN, BLUE, WHITE), seconds: float = 2.0, fps: int = 10,
                     size: tuple[int, int] = (160, 120), audio_amplitude: float | None = None,
                     fmt: str = "mp4") -> bytes:
    """Each colour, solid, for an equal share of the time, as H.264 MP4 or VP9 WebM; with a mono 48 kHz sine
    (AAC or Opus) if `audio_amplitude` is set."""
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        video = container.add_stream(VIDEO_CODECS[fmt], rate=fps)
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        # Every stream must exist before the first packet is muxed: that writes the header.
        audio = _add_audio(container, AUDIO_CODECS[fmt], 48000, 1) if audio_amplitude is not None else None
        frames = round(seconds * fps)
        for index in range(frames):
            color = colors[index * len(colors) // frames]
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), color, np.uint8), format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio is not None:
            _write_sine(container, audio, seconds, (audio_amplitude,))
    return out.getvalue()


def make_png(width: int = 64, height: int = 48, color: RGB = RED, noise: bool = False, seed: int = 0) -> bytes:
    """A solid-colour PNG, or random RGB noise (which PNG cannot compress: about 3 bytes a pixel)."""
    if noise:
        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    else:
        pixels = np.full((height, width, 3), color, np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def center_color(png: bytes) -> RGB:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    return image.getpixel((image.width // 2, image.height // 2))


def assert_close_color(actual: RGB, expected: RGB, tolerance: int = 12) -> None:
    assert max(abs(a - e) for a, e in zip(actual, expected, strict=True)) <= tolerance, (actual, expected)


# Audio


def test_wav_sine_reports_its_length_format_and_level() -> None:
    data = make_sine_audio(2.0, (0.5,))
    facts = probe(data, "audio/wav")
    assert facts.model_dump(exclude={"loudness_dbfs", "peak_dbfs"}) == {
        "media_type": "audio/wav", "format": "pcm_s16le", "size_bytes": len(data), "width": None, "height": None,
        "duration_s": 2.0, "fps": None, "frame_count": None, "sample_rate": 44100, "channels": 1,
    }
    assert facts.loudness_dbfs == pytest.approx(sine_dbfs((0.5,)), abs=0.02)  # -9.03
    assert facts.peak_dbfs == pytest.approx(-6.02, abs=0.02)


def test_mp3_sine_reports_its_length_and_level_within_codec_error() -> None:
    facts = probe(make_sine_audio(3.0, (0.5,), fmt="mp3", rate=48000), "audio/mpeg")
    assert (facts.format, facts.sample_rate, facts.channels) == ("mp3", 48000, 1)
    assert facts.duration_s == pytest.approx(3.0, abs=0.06)
    # The bundled LAME plays this sine back about 0.45 dB quieter, evenly over the whole file.
    assert facts.loudness_dbfs == pytest.approx(sine_dbfs((0.5,)), abs=0.75)
    assert facts.peak_dbfs == pytest.approx(-6.02, abs=0.75)


def test_stereo_level_pools_both_channels() -> None:
    # Left at 0.5, right silent: half the power of a mono 0.5 sine, so 3 dB lower, while the peak is the left's.
    facts = probe(make_sine_audio(1.0, (0.5, 0.0)), "audio/wav")
    assert facts.channels == 2
    assert facts.loudness_dbfs == pytest.approx(sine_dbfs((0.5, 0.0)), abs=0.02)  # -12.04
    assert facts.peak_dbfs == pytest.approx(-6.02, abs=0.02)


def test_silence_reads_as_the_floor_not_minus_infinity() -> None:
    facts = probe(make_sine_audio(1.0, (0.0, 0.0)), "audio/wav")
    assert (facts.loudness_dbfs, facts.peak_dbfs) == (SILENCE_DBFS, SILENCE_DBFS)
    assert "loudness: silent" in facts_text(facts)
    assert "inf" not in facts.model_dump_json()


# Video


def test_video_reports_size_rate_frames_and_no_audio() -> None:
    data = make_color_video(seconds=2.0, fps=10, size=(160, 120))
    facts = probe(data, "video/mp4")
    assert facts.model_dump() == {
        "media_type": "video/mp4", "format": "h264", "size_bytes": len(data), "width": 160, "height": 120,
        "duration_s": 2.0, "fps": 10.0, "frame_count": 20, "sample_rate": None, "channels": None,
        "loudness_dbfs": None, "peak_dbfs": None,
    }


def test_video_with_an_audio_track_reports_its_level() -> None:
    facts = probe(make_color_video(audio_amplitude=0.25), "video/mp4")
    assert (facts.format, facts.frame_count, facts.duration_s) == ("h264", 20, 2.0)
    assert (facts.sample_rate, facts.channels) == (48000, 1)
    assert facts.loudness_dbfs == pytest.approx(sine_dbfs((0.25,)), abs=0.5)  # -15.05
    # No peak check: AAC rings where the sine stops dead, overshooting 0.25 near the end.


def test_webm_without_a_recorded_frame_count_is_counted() -> None:
    data = make_color_video(fmt="webm", audio_amplitude=0.5)
    facts = probe(data, "video/webm")
    assert (facts.format, facts.width, facts.height, facts.fps) == ("vp9", 160, 120, 10.0)
    assert (facts.frame_count, facts.sample_rate) == (20, 48000)
    assert facts.duration_s == pytest.approx(2.0, abs=0.05)  # WebM records only the file's, audio padding included
    assert facts.loudness_dbfs == pytest.approx(sine_dbfs((0.5,)), abs=0.5)
    for png, color in zip(sample_frames(data, 4), (RED, GREEN, BLUE, WHITE), strict=True):
        assert_close_color(center_color(png), color)


def test_sample_frames_spreads_over_the_whole_video() -> None:
    colors = (RED, GREEN, BLUE, WHITE)
    pngs = sample_frames(make_color_video(colors, seconds=2.0, fps=10), 4)
    assert len(pngs) == len(set(pngs)) == 4
    for png, color in zip(pngs, colors, strict=True):  # one frame from each quarter, in time order
        assert Image.open(io.BytesIO(png)).format == "PNG"
        assert_close_color(center_color(png), color)


def test_sample_frames_downscales_to_max_side() -> None:
    pngs = sample_frames(make_color_video(size=(640, 360)), 2, max_side=320)
    assert [Image.open(io.BytesIO(png)).size for png in pngs] == [(320, 180), (320, 180)]


def test_sample_frames_of_a_short_video_gives_each_frame_once() -> None:
    pngs = sample_frames(make_color_video((RED, GREEN, BLUE), seconds=0.3, fps=10), 8)
    assert len(pngs) == 3
    for png, color in zip(pngs, (RED, GREEN, BLUE), strict=True):
        assert_close_color(center_color(png), color)


# Images


def test_png_reports_format_and_size() -> None:
    data = make_png(300, 200)
    assert probe(data, "image/png") == MediaFacts(media_type="image/png", format="png", size_bytes=len(data),
                                                  width=300, height=200)


def test_evaluator_image_passes_an_acceptable_image_through() -> None:
    data = make_png(800, 600)
    assert evaluator_image(data, "image/png") == ("image/png", data)


def test_evaluator_image_shrinks_a_large_noisy_png_under_both_limits() -> None:
    data = make_png(4000, 3000, noise=True)
    assert len(data) > EVALUATOR_MAX_BYTES
    media_type, shrunk = evaluator_image(data, "image/png")
    assert len(shrunk) <= EVALUATOR_MAX_BYTES
    image = Image.open(io.BytesIO(shrunk))
    image.load()
    assert (f"image/{image.format.lower()}", image.size) == (media_type, (EVALUATOR_MAX_SIDE, 1176))


def test_evaluator_image_turns_a_png_too_heavy_at_full_size_into_jpeg() -> None:
    data = make_png(EVALUATOR_MAX_SIDE, 1176, noise=True)  # small enough, but noise weighs 5.5 MB as PNG
    assert len(data) > EVALUATOR_MAX_BYTES
    media_type, shrunk = evaluator_image(data, "image/png")
    image = Image.open(io.BytesIO(shrunk))
    image.load()
    assert (media_type, image.format, image.size) == ("image/jpeg", "JPEG", (EVALUATOR_MAX_SIDE, 1176))
    assert len(shrunk) <= EVALUATOR_MAX_BYTES


def test_evaluator_image_downscales_a_wide_png_and_keeps_it_png() -> None:
    media_type, shrunk = evaluator_image(make_png(3136, 1000, color=BLUE), "image/png")
    assert media_type == "image/png"
    assert Image.open(io.BytesIO(shrunk)).size == (1568, 500)
    assert_close_color(center_color(shrunk), BLUE, tolerance=0)


def test_evaluator_image_converts_a_type_the_apis_refuse() -> None:
    out = io.BytesIO()
    Image.new("CMYK", (100, 80), (0, 255, 255, 0)).save(out, format="TIFF")
    media_type, converted = evaluator_image(out.getvalue(), "image/tiff")
    assert media_type == "image/png"
    assert_close_color(center_color(converted), RED)


def test_evaluator_image_meets_a_tighter_byte_limit_with_smaller_jpegs() -> None:
    media_type, shrunk = evaluator_image(make_png(1000, 1000, noise=True), "image/png", max_bytes=100_000)
    assert media_type == "image/jpeg" and len(shrunk) <= 100_000
    assert max(Image.open(io.BytesIO(shrunk)).size) < 1000


# Text and errors


def test_facts_text_has_a_line_for_each_fact_that_is_set() -> None:
    audio = MediaFacts(media_type="audio/mpeg", format="mp3", size_bytes=48_000, duration_s=3.02, sample_rate=44100,
                       channels=2, loudness_dbfs=-18.06, peak_dbfs=-6.0)
    assert facts_text(audio) == ("format: mp3, 44100 Hz, 2 channels\nfile: audio/mpeg, 48000 bytes\n"
                                 "duration: 3.02 s\nloudness: -18.1 dBFS RMS, peak -6.0 dBFS")
    image = MediaFacts(media_type="image/png", format="png", size_bytes=512, width=1024, height=1024)
    assert facts_text(image) == "format: png\nfile: image/png, 512 bytes\nsize: 1024x1024 px"


def test_facts_text_of_a_video_with_sound() -> None:
    text = facts_text(probe(make_color_video(audio_amplitude=0.5), "video/mp4"))
    assert text.splitlines()[0] == "format: h264, 10 fps, 20 frames, audio 48000 Hz, 1 channel"
    assert "size: 160x120 px" in text and "duration: 2.00 s" in text and "dBFS RMS" in text


@pytest.mark.parametrize("media_type", ["audio/mpeg", "video/mp4", "image/png"])
def test_garbage_bytes_raise_unreadable_media_naming_the_type(media_type: str) -> None:
    with pytest.raises(UnreadableMedia, match=f"the generated {media_type} could not be decoded: .+"):
        probe(b"this is not media" * 50, media_type)


def test_truncated_png_is_unreadable() -> None:
    with pytest.raises(UnreadableMedia, match="image/png could not be decoded"):
        probe(make_png(200, 200, noise=True)[:5000], "image/png")


def test_a_file_without_the_expected_stream_is_unreadable() -> None:
    with pytest.raises(UnreadableMedia, match="video/mp4 could not be decoded: it holds no video stream"):
        probe(make_sine_audio(0.5), "video/mp4")
    with pytest.raises(UnreadableMedia, match="video could not be decoded: it holds no video stream"):
        sample_frames(make_sine_audio(0.5), 3)
    with pytest.raises(UnreadableMedia, match="the generated video could not be decoded"):
        sample_frames(b"\x00" * 1000, 3)


def test_unknown_media_type_is_refused() -> None:
    with pytest.raises(UnreadableMedia, match="only image/\\*, audio/\\* and video/\\* can be probed"):
        probe(b"{}", "application/json")
