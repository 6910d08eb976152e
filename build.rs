//! Records which torch the extension is compiled against (`WANDAPP_TORCH_VERSION`), so that
//! `import wandapp` under another torch can name both versions instead of failing in the loader.
//! The interpreter asked is the one maturin builds for (`PYO3_PYTHON`), else the one torch-sys
//! asks (`python` inside a virtualenv, else `python3`).
//!
//! It also adds the lib folder of that torch to the link search path: torch-sys records the
//! folder it found when its build script ran, and a cached build (one CARGO_TARGET_DIR per torch
//! release, shared by clones: CI's) may have recorded a venv that is gone by now.
//!
//! With the Python binding, it also compiles `src/c/python313_compat.c` into the extension (why:
//! see that file), whole, so that the linker keeps it whatever the order of the archives.

use std::env;
use std::path::Path;
use std::process::Command;

fn main() {
    for var in ["PYO3_PYTHON", "VIRTUAL_ENV"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    // Relative to the crate root, as cargo reads it (this file serves two manifests).
    println!("cargo:rerun-if-changed={}", file!());
    let python = env::var("PYO3_PYTHON")
        .unwrap_or_else(|_| if env::var_os("VIRTUAL_ENV").is_some() { "python".into() } else { "python3".into() });
    // Read from the package metadata, without importing torch.
    let probe = "import importlib.metadata as m, importlib.util as u, os; print(m.version('torch').split('+')[0]); \
                 print(os.path.join(u.find_spec('torch').submodule_search_locations[0], 'lib'))";
    let found = Command::new(&python)
        .args(["-c", probe])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect::<Vec<_>>())
        .unwrap_or_default();
    let version = found.first().cloned().unwrap_or_else(|| "unknown".into());
    if let Some(lib) = found.get(1) {
        println!("cargo:rustc-link-search=native={lib}");
    }
    println!("cargo:rustc-env=WANDAPP_TORCH_VERSION={version}");

    if env::var_os("CARGO_FEATURE_PYTHON").is_some() {
        // Beside this file: cargo runs it from the crate root of either manifest.
        let compat = Path::new(file!()).with_file_name("src/c/python313_compat.c");
        println!("cargo:rerun-if-changed={}", compat.display());
        cc::Build::new().file(compat).link_lib_modifier("+whole-archive").compile("wandapp_python313_compat");
    }
}
