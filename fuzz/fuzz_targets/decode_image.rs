//! Arbitrary bytes as an encoded image: `probe` and `decode` must return, never panic, and agree.
//!
//! `decode`/`probe` catch panics raised inside the third-party decoders (see `guarded` in
//! vaelink-core) and return them as errors. libFuzzer's panic hook would abort on those before the
//! guard sees them, so this target installs its own hook: a panic located in a crates.io dependency
//! is logged once per location and its input saved as `artifacts/decode_image/caught-*`, then
//! allowed to unwind into the guard; any other panic (vaelink's own code, or the harness) aborts as
//! usual and is reported as a crash. Set `VAELINK_FUZZ_STRICT=1` to abort on every panic.
#![no_main]

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::{Mutex, Once};

use libfuzzer_sys::fuzz_target;
use vaelink_core::image_codec::{decode, probe, DecodeOptions};

thread_local! {
    static INPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}
static HOOK: Once = Once::new();
static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);

fn install_hook() {
    if std::env::var_os("VAELINK_FUZZ_STRICT").is_some() {
        return;
    }
    let abort_hook = std::panic::take_hook(); // libFuzzer's: print, then abort
    std::panic::set_hook(Box::new(move |info| {
        let Some(loc) = info.location() else {
            return abort_hook(info);
        };
        let third_party = loc.file().contains("/.cargo/registry/");
        if !third_party {
            return abort_hook(info);
        }
        let key = format!("{}:{}", loc.file(), loc.line());
        let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        if seen.get_or_insert_with(HashSet::new).insert(key.clone()) {
            // `…/index.crates.io-<hash>/zune-jpeg-0.5.15/src/idct/scalar.rs:37` -> `zune-jpeg-0.5.15…`
            let short = key
                .split_once("index.crates.io-")
                .and_then(|(_, rest)| rest.split_once('/'))
                .map_or(key.as_str(), |(_, rest)| rest);
            let name: String = short
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let path = format!("artifacts/decode_image/caught-{name}");
            INPUT.with(|input| {
                let _ = std::fs::create_dir_all("artifacts/decode_image");
                let _ = std::fs::write(&path, &*input.borrow());
            });
            eprintln!("caught third-party panic at {key}: {info}\n  input saved to {path}");
        }
    }));
}

fuzz_target!(|data: &[u8]| {
    HOOK.call_once(install_hook);
    INPUT.with(|input| {
        let mut input = input.borrow_mut();
        input.clear();
        input.extend_from_slice(data);
    });

    let options = DecodeOptions {
        max_pixels: 4_000_000,
        background: Some([255, 255, 255]),
    };
    let probed = probe(data);
    let composited = decode(data, &options);
    if let Ok(img) = &composited {
        assert_eq!(img.data.len(), img.width * img.height * 3);
        assert!(img.width * img.height <= 4_000_000);
        let info = probed.expect("decode succeeded, so probe must too");
        assert_eq!((info.width, info.height), (img.width, img.height));
    }
    // Dropping alpha differs only after decoding (no compositing): it must succeed or fail alike.
    let dropped = decode(
        data,
        &DecodeOptions {
            background: None,
            ..options
        },
    );
    assert_eq!(dropped.is_ok(), composited.is_ok());
    if let (Ok(a), Ok(b)) = (&dropped, &composited) {
        assert_eq!((a.width, a.height), (b.width, b.height));
    }
});
