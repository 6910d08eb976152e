//! Records which torch the extension is compiled against (`WANDAPP_TORCH_VERSION`), read from the
//! same Python interpreter torch-sys asks (`python` inside a virtualenv, else `python3`), so that
//! `import wandapp` under another torch can name both versions instead of failing in the loader.

use std::env;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    println!("cargo:rerun-if-changed=build.rs");
    let python = if env::var_os("VIRTUAL_ENV").is_some() { "python" } else { "python3" };
    let version = Command::new(python)
        .args(["-c", "import importlib.metadata as m; print(m.version('torch').split('+')[0])"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=WANDAPP_TORCH_VERSION={version}");
}
