//! libjpeg-turbo through its TurboJPEG 3 API (`turbojpeg-sys`, built from its vendored sources with
//! cmake, its SIMD with nasm): the JPEG encoder, and the decoder of 8-bit JPEGs in YCbCr, gray or
//! RGB. The only `unsafe` for JPEG is here. TurboJPEG reports every failure, corrupt data included,
//! as a return code (its C error handler longjmps inside the library), so nothing unwinds through C.

use std::ffi::{c_int, CStr};
use std::ptr::NonNull;

use turbojpeg_sys as tj;

use super::jpeg::ChromaSubsampling;
use crate::error::{Error, Result};

/// Progressive scans beyond this are refused: a crafted file with thousands of scans otherwise costs
/// seconds of CPU (libjpeg-turbo's own advice for untrusted input).
const SCAN_LIMIT: c_int = 500;

/// One TurboJPEG instance, destroyed on drop, with the error kind of its direction (an encoder's
/// failures are `Error::Encode`, a decoder's `Error::Decode`).
struct Handle {
    raw: NonNull<std::ffi::c_void>,
    error: fn(String) -> Error,
}

impl Handle {
    fn new(kind: tj::TJINIT) -> Result<Self> {
        let error = if kind == tj::TJINIT_TJINIT_COMPRESS {
            Error::Encode
        } else {
            Error::Decode
        };
        // SAFETY: tj3Init has no preconditions; it returns null on failure.
        let raw = unsafe { tj::tj3Init(kind as c_int) };
        let raw = NonNull::new(raw)
            .ok_or_else(|| error("libjpeg-turbo could not start (out of memory)".into()))?;
        Ok(Self { raw, error })
    }

    fn set(&self, param: tj::TJPARAM, value: c_int) -> Result<()> {
        // SAFETY: the handle is live; an unknown parameter or value is an error return.
        match unsafe { tj::tj3Set(self.raw.as_ptr(), param as c_int, value) } {
            0 => Ok(()),
            _ => Err((self.error)(self.message())),
        }
    }

    fn get(&self, param: tj::TJPARAM) -> c_int {
        // SAFETY: the handle is live; an unknown parameter gives -1.
        unsafe { tj::tj3Get(self.raw.as_ptr(), param as c_int) }
    }

    /// The last call's error message.
    fn message(&self) -> String {
        // SAFETY: the handle is live; the string is owned by it and copied out at once.
        unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.raw.as_ptr())) }
            .to_string_lossy()
            .into_owned()
    }

    /// Whether the last call's error was only a warning: the output is still whole, as for a
    /// truncated file, whose missing rows libjpeg-turbo fills in.
    fn warned(&self) -> bool {
        // SAFETY: the handle is live.
        unsafe { tj::tj3GetErrorCode(self.raw.as_ptr()) == tj::TJERR_TJERR_WARNING as c_int }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by tj3Init, destroyed once.
        unsafe { tj::tj3Destroy(self.raw.as_ptr()) }
    }
}

fn int(value: usize, what: &str) -> Result<c_int> {
    c_int::try_from(value).map_err(|_| Error::Encode(format!("{what} {value} is too large")))
}

fn subsamp(subsampling: ChromaSubsampling) -> tj::TJSAMP {
    match subsampling {
        ChromaSubsampling::S444 => tj::TJSAMP_TJSAMP_444,
        ChromaSubsampling::S422 => tj::TJSAMP_TJSAMP_422,
        ChromaSubsampling::S420 => tj::TJSAMP_TJSAMP_420,
    }
}

/// Encodes `height` rows of interleaved RGB8 `pixels` as a baseline JPEG with libjpeg-turbo's
/// defaults (accurate DCT, standard Huffman tables: what Pillow writes), appending to `out`;
/// `restart_blocks`: MCUs between restart markers.
pub(super) fn compress(
    pixels: &[u8],
    width: usize,
    height: usize,
    quality: u8,
    subsampling: ChromaSubsampling,
    restart_blocks: Option<u16>,
    out: &mut Vec<u8>,
) -> Result<()> {
    super::check_rgb_len(width, height, pixels.len())?;
    let (w, h) = (int(width, "width")?, int(height, "height")?);
    let pitch = int(width * 3, "row length")?;
    let handle = Handle::new(tj::TJINIT_TJINIT_COMPRESS)?;
    handle.set(
        tj::TJPARAM_TJPARAM_QUALITY,
        c_int::from(quality.clamp(1, 100)),
    )?;
    handle.set(tj::TJPARAM_TJPARAM_SUBSAMP, subsamp(subsampling) as c_int)?;
    // The buffer is ours, sized for the worst case, and TurboJPEG may not reallocate it.
    handle.set(tj::TJPARAM_TJPARAM_NOREALLOC, 1)?;
    if let Some(blocks) = restart_blocks {
        handle.set(tj::TJPARAM_TJPARAM_RESTARTBLOCKS, c_int::from(blocks))?;
    }
    // SAFETY: a pure size computation; 0 means the arguments are invalid.
    let bound = unsafe { tj::tj3JPEGBufSize(w, h, subsamp(subsampling) as c_int) };
    let bound = usize::try_from(bound)
        .ok()
        .filter(|&b| b > 0)
        .ok_or_else(|| Error::Encode(format!("cannot encode a {width}x{height} JPEG")))?;
    let start = out.len();
    out.reserve(bound);
    // SAFETY: `start` is `out`'s length, within its allocation.
    let mut dst = unsafe { out.as_mut_ptr().add(start) };
    let mut size = bound as tj::size_t;
    // SAFETY: `pixels` holds `height` rows of `pitch` bytes (checked above); `dst` points at
    // `bound` writable bytes and NOREALLOC keeps TurboJPEG within them; `size` says how many.
    let status = unsafe {
        tj::tj3Compress8(
            handle.raw.as_ptr(),
            pixels.as_ptr(),
            w,
            pitch,
            h,
            tj::TJPF_TJPF_RGB as c_int,
            &mut dst,
            &mut size,
        )
    };
    if status != 0 {
        return Err(Error::Encode(format!(
            "cannot encode image: {}",
            handle.message()
        )));
    }
    let written = usize::try_from(size)
        .ok()
        .filter(|&n| n <= bound)
        .ok_or_else(|| Error::Encode("libjpeg-turbo wrote past its buffer".into()))?;
    // SAFETY: TurboJPEG initialised the first `written` bytes of the spare capacity.
    unsafe { out.set_len(start + written) };
    Ok(())
}

/// What a JPEG's header says, when libjpeg-turbo can decode it to 8-bit RGB itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    pub width: usize,
    pub height: usize,
}

/// A decompressor that has read a JPEG's header: the caller checks the size, then decodes with
/// the same instance (one instance, one header parse per image).
pub(super) struct Decoder {
    handle: Handle,
    pub header: Header,
}

impl Decoder {
    /// The decoder of a JPEG libjpeg-turbo decodes to RGB8 (8-bit, YCbCr, gray or RGB); `None` for
    /// anything else (CMYK/YCCK, 12-bit, lossless above 8 bits, or no readable header): the
    /// caller's other decoder handles those and reports what is wrong.
    pub fn open(bytes: &[u8]) -> Option<Self> {
        let handle = Handle::new(tj::TJINIT_TJINIT_DECOMPRESS).ok()?;
        let header = read_header(&handle, bytes)?;
        Some(Self { handle, header })
    }

    /// Decodes the JPEG whose header `open` read (the same `bytes`) to interleaved RGB8. A file
    /// cut short decodes with its missing rows filled in, as libjpeg (and Pillow) do; only an
    /// error that leaves no image fails.
    pub fn decompress(self, bytes: &[u8]) -> Result<Vec<u8>> {
        let Header { width, height } = self.header;
        let handle = self.handle;
        handle.set(tj::TJPARAM_TJPARAM_SCANLIMIT, SCAN_LIMIT)?;
        let pitch = width.checked_mul(3).and_then(|p| c_int::try_from(p).ok());
        let len = width.checked_mul(height).and_then(|p| p.checked_mul(3));
        let (Some(pitch), Some(len)) = (pitch, len) else {
            return Err(Error::Decode(format!(
                "cannot decode a {width}x{height} JPEG"
            )));
        };
        // Not zeroed first: a reused allocation would be cleared at memset speed (about 12% of a
        // decode), and libjpeg-turbo writes every row of a decode it finishes.
        let mut pixels = Vec::<u8>::with_capacity(len);
        // SAFETY: `pixels` has room for `height` rows of `pitch` bytes, the size of the header
        // this handle read from these same bytes.
        let status = unsafe {
            tj::tj3Decompress8(
                handle.raw.as_ptr(),
                bytes.as_ptr(),
                bytes.len() as tj::size_t,
                pixels.as_mut_ptr(),
                pitch,
                tj::TJPF_TJPF_RGB as c_int,
            )
        };
        if status != 0 && !handle.warned() {
            return Err(Error::Decode(format!(
                "cannot decode image: {}",
                handle.message()
            )));
        }
        // SAFETY: a decode that ends without error, or with only a warning (data cut short, its
        // missing rows filled in), has written all `height` rows.
        unsafe { pixels.set_len(len) };
        Ok(pixels)
    }
}

fn read_header(handle: &Handle, bytes: &[u8]) -> Option<Header> {
    // SAFETY: the pointer and length describe `bytes`.
    let status = unsafe {
        tj::tj3DecompressHeader(
            handle.raw.as_ptr(),
            bytes.as_ptr(),
            bytes.len() as tj::size_t,
        )
    };
    let colorspace = handle.get(tj::TJPARAM_TJPARAM_COLORSPACE);
    let plain = [tj::TJCS_TJCS_YCbCr, tj::TJCS_TJCS_GRAY, tj::TJCS_TJCS_RGB]
        .map(|cs| cs as c_int)
        .contains(&colorspace);
    if status != 0 || !plain || handle.get(tj::TJPARAM_TJPARAM_PRECISION) != 8 {
        return None;
    }
    let width = usize::try_from(handle.get(tj::TJPARAM_TJPARAM_JPEGWIDTH)).ok()?;
    let height = usize::try_from(handle.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT)).ok()?;
    (width > 0 && height > 0).then_some(Header { width, height })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(width: usize, height: usize) -> Vec<u8> {
        (0..height)
            .flat_map(|y| {
                (0..width).flat_map(move |x| [(x * 3) as u8, (y * 5) as u8, (x ^ y) as u8])
            })
            .collect()
    }

    fn encode(pixels: &[u8], w: usize, h: usize, sub: ChromaSubsampling) -> Vec<u8> {
        let mut out = vec![1, 2, 3]; // appends after what is there
        compress(pixels, w, h, 90, sub, None, &mut out).unwrap();
        assert_eq!(&out[..3], &[1, 2, 3]);
        out.split_off(3)
    }

    #[test]
    fn round_trip_in_every_subsampling() {
        let (w, h) = (67, 45);
        let pixels = gradient(w, h);
        for sub in [
            ChromaSubsampling::S444,
            ChromaSubsampling::S422,
            ChromaSubsampling::S420,
        ] {
            let jpeg = encode(&pixels, w, h, sub);
            let decoder = Decoder::open(&jpeg).expect("an 8-bit YCbCr JPEG");
            let expected = Header {
                width: w,
                height: h,
            };
            assert_eq!(decoder.header, expected);
            let back = decoder.decompress(&jpeg).unwrap();
            let reference = image::load_from_memory(&jpeg).unwrap().to_rgb8();
            let worst = back
                .iter()
                .zip(reference.as_raw())
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            // zune-jpeg and libjpeg-turbo upsample chroma a little differently.
            assert!(worst <= 12, "{sub:?}: largest difference {worst}");
        }
    }

    #[test]
    fn truncated_files_decode_and_garbage_does_not() {
        let (w, h) = (64, 64);
        let jpeg = encode(&gradient(w, h), w, h, ChromaSubsampling::S420);
        let cut = &jpeg[..jpeg.len() * 2 / 3];
        let decoder = Decoder::open(cut).expect("the header is whole");
        assert_eq!(decoder.decompress(cut).unwrap().len(), w * h * 3);
        assert!(Decoder::open(&jpeg[..20]).is_none());
        assert!(Decoder::open(b"not a jpeg at all").is_none());
        let mut broken = jpeg.clone();
        let scan = broken.len() / 2;
        broken[scan..].fill(0xFF);
        // Either filled in as a warning or refused: never a crash.
        let _ = Decoder::open(&broken).map(|d| d.decompress(&broken));
    }

    #[test]
    fn errors_name_the_handles_direction() {
        // Quality means nothing to a decoder, and 1000 is out of range for an encoder.
        let decoder = Handle::new(tj::TJINIT_TJINIT_DECOMPRESS).unwrap();
        let err = decoder.set(tj::TJPARAM_TJPARAM_QUALITY, 90).unwrap_err();
        assert!(matches!(err, Error::Decode(_)), "{err:?}");
        let encoder = Handle::new(tj::TJINIT_TJINIT_COMPRESS).unwrap();
        let err = encoder.set(tj::TJPARAM_TJPARAM_QUALITY, 1000).unwrap_err();
        assert!(matches!(err, Error::Encode(_)), "{err:?}");
    }
}
