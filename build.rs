//! Generates include/MemorySnapshot.h from the C ABI with cbindgen (see cbindgen.toml).

use std::path::PathBuf;

fn main() {
    let dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    println!("cargo:rerun-if-changed=cbindgen.toml");
    // Library conventions (docs/packaging.md). macOS: an installed dylib must not name the
    // build tree (hosts find it through their rpath), and it carries its version. Linux: the
    // SONAME hosts record. (The exported symbols are rustc's own list, checked against
    // memsnap.map by `make check-exports`: GNU ld refuses a second anonymous version script.)
    let version = std::env::var("CARGO_PKG_VERSION").expect("cargo sets CARGO_PKG_VERSION");
    let major: u32 = std::env::var("CARGO_PKG_VERSION_MAJOR")
        .expect("cargo sets CARGO_PKG_VERSION_MAJOR")
        .parse()
        .expect("a number");
    match std::env::var("CARGO_CFG_TARGET_OS").as_deref() {
        Ok("macos") => {
            // libtool's numbering: ABI `major` (the SONAME's on Linux) is compatibility
            // version major + 1, never the 0.0.0 of an unversioned dylib.
            let compat = major + 1;
            println!("cargo:rustc-cdylib-link-arg=-Wl,-install_name,@rpath/libmemsnap.dylib");
            println!("cargo:rustc-cdylib-link-arg=-Wl,-current_version,{version}");
            println!("cargo:rustc-cdylib-link-arg=-Wl,-compatibility_version,{compat}.0.0");
        }
        Ok("linux") => {
            println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libmemsnap.so.{major}");
        }
        _ => {}
    }
    println!("cargo:rerun-if-changed=src/ffi");
    let config =
        cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml is valid");
    let out = dir.join("include").join("MemorySnapshot.h");
    match cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
    {
        Ok(bindings) => {
            // Only rewrite on change, so builds do not dirty the tree needlessly.
            bindings.write_to_file(&out);
        }
        Err(e) => panic!("cbindgen could not generate {}: {e}", out.display()),
    }
}
