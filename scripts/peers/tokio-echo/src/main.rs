//! tokio's echo example (examples/echo.rs in the tokio repository), written out here so the
//! comparison has an independent epoll server built from a well-known crate. Usage:
//! `tokio-echo [ADDR] [WORKER_THREADS]`; prints `listening on ADDR` once bound.
//!
//! One change from the example: TCP_NODELAY, as prefork-echo sets it. Without it the example's
//! 1 KiB writes meet Nagle's algorithm and delayed ACKs, and a 4 KiB echo waits ~40 ms: a
//! socket-option artefact, not a property of the concurrency model being compared.

use std::env;
use std::error::Error;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn main() -> Result<(), Box<dyn Error>> {
    let addr = env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".to_string());
    let threads: usize = env::args().nth(2).and_then(|t| t.parse().ok()).unwrap_or(2);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?
        .block_on(serve(addr))
}

async fn serve(addr: String) -> Result<(), Box<dyn Error>> {
    let listener = TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (mut socket, _) = listener.accept().await?;
        let _ = socket.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0; 1024];
            loop {
                let n = match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if socket.write_all(&buf[0..n]).await.is_err() {
                    return;
                }
            }
        });
    }
}
