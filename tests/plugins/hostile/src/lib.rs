//! Misbehaves as its config says, so the tests can check that each
//! misbehaviour ends as a recorded plugin error within its limit.

use std::hint::black_box;

use serde::Deserialize;
use wasmhook_sdk::{Config, Error, Event, Outcome};

#[derive(Deserialize)]
struct Mode {
    mode: String,
}

fn transform(event: Event, config: Config) -> Result<Outcome, Error> {
    let Mode { mode } = config.get()?;
    match mode.as_str() {
        "loop" => loop {
            black_box(&event);
        },
        "alloc" => {
            // One huge allocation: fails at once against the memory cap,
            // whatever the machine's speed.
            let mut hoard: Vec<u8> = Vec::with_capacity(black_box(256 << 20));
            hoard.push(1);
            Ok(Outcome::deliver_bytes(black_box(hoard)))
        }
        "recurse" => Ok(Outcome::deliver_bytes(vec![recurse(black_box(1)) as u8])),
        "shadow-stack" => Ok(Outcome::deliver_bytes(vec![shadow(black_box(1)) as u8])),
        "big-output" => Ok(Outcome::deliver_bytes(vec![b'x'; 2 * 1024 * 1024])),
        "trap" => panic!("boom: the hostile plugin panicked on purpose"),
        "forbidden-header" => {
            Ok(Outcome::deliver_bytes(b"{}".to_vec()).header("webhook-signature", "v1,forged"))
        }
        "read-file" => {
            let text = std::fs::read_to_string("/etc/passwd")
                .map_err(|e| Error::new(format!("read failed: {e}")))?;
            Ok(Outcome::deliver_bytes(text))
        }
        "socket" => {
            let stream = std::net::TcpStream::connect("127.0.0.1:80");
            stream.map_err(|e| Error::new(format!("connect failed: {e}")))?;
            Ok(Outcome::deliver_bytes(b"connected".to_vec()))
        }
        "env" => Ok(Outcome::deliver_bytes(format!(
            "{:?}",
            std::env::vars().collect::<Vec<_>>()
        ))),
        // What a plugin hands back must be bounded and valid before it is
        // sent, stored or shown.
        "crlf-header" => {
            Ok(Outcome::deliver_bytes(b"{}".to_vec()).header("x-ok", "a\r\nx-injected: 1"))
        }
        "space-header-name" => Ok(Outcome::deliver_bytes(b"{}".to_vec()).header("x bad", "v")),
        "many-headers" => {
            let mut out = Outcome::deliver_bytes(b"{}".to_vec());
            for i in 0..20_000 {
                out = out.header(format!("x-h{i}"), "v");
            }
            Ok(out)
        }
        "huge-header-value" => {
            Ok(Outcome::deliver_bytes(b"{}".to_vec()).header("x-big", "v".repeat(4 << 20)))
        }
        "huge-content-type" => Ok(Outcome::deliver_bytes(b"{}".to_vec())
            .content_type(format!("application/{}", "x".repeat(1 << 20)))),
        "huge-error" => Err(Error::new("e".repeat(8 << 20))),
        "huge-skip" => Ok(Outcome::skip("s".repeat(8 << 20))),
        "log-flood" => {
            for i in 0..10_000 {
                wasmhook_sdk::info!("line {i}");
            }
            Ok(Outcome::deliver_bytes(b"{}".to_vec()))
        }
        other => Err(Error::new(format!("unknown mode {other}"))),
    }
}

/// Unbounded recursion on the wasm stack (scalars only, and a combination
/// the optimiser cannot turn into a loop).
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    if depth == 0 {
        return 1;
    }
    recurse(depth.wrapping_add(1)).rotate_left(3) ^ depth
}

/// Unbounded recursion on the guest's own stack in linear memory.
#[inline(never)]
fn shadow(depth: u64) -> u64 {
    let padding = black_box([depth; 16]);
    if black_box(depth) == 0 {
        return padding[0];
    }
    shadow(depth + 1) + padding[15]
}

wasmhook_sdk::export!(transform);
