//! tokio's chat example (examples/chat.rs in the tokio repository), written out here so the
//! chat comparison has an independent server built the way tokio shows: one process, a task
//! per client, a shared map of peers under a mutex, each peer fed by an unbounded channel,
//! lines framed with `LinesCodec`. Usage: `tokio-chat [ADDR] [WORKER_THREADS]`; prints
//! `listening on ADDR` once bound.
//!
//! Changes from the example, all to speak the lines `chat-load` (and prefork-echo's chat)
//! speak, none to its concurrency: a welcome line instead of the username prompt, names
//! changed with `/nick NAME` (announced as `* OLD is now NEW`), join and leave notices in the
//! `* ` form, and TCP_NODELAY, as prefork-echo sets it.

use std::collections::HashMap;
use std::env;
use std::error::Error;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::SinkExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::StreamExt;
use tokio_util::codec::{Framed, LinesCodec};

type Tx = mpsc::UnboundedSender<String>;

/// The example's shared state: every peer's sending half.
struct Shared {
    peers: HashMap<SocketAddr, Tx>,
}

impl Shared {
    /// Sends `message` to every peer but `sender`.
    fn broadcast(&self, sender: Option<SocketAddr>, message: &str) {
        for (addr, tx) in &self.peers {
            if Some(*addr) != sender {
                let _ = tx.send(message.into());
            }
        }
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let addr = env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:6142".to_string());
    let threads: usize = env::args().nth(2).and_then(|t| t.parse().ok()).unwrap_or(2);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?
        .block_on(serve(addr))
}

async fn serve(addr: String) -> Result<(), Box<dyn Error>> {
    let state = Arc::new(Mutex::new(Shared {
        peers: HashMap::new(),
    }));
    let listener = TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let guests = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, addr) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        let guest = guests.fetch_add(1, Ordering::Relaxed) + 1;
        tokio::spawn(async move {
            let _ = process(state, stream, addr, format!("guest{guest}")).await;
        });
    }
}

async fn process(
    state: Arc<Mutex<Shared>>,
    stream: TcpStream,
    addr: SocketAddr,
    mut name: String,
) -> Result<(), Box<dyn Error + Send + Sync>> {
    let mut lines = Framed::new(stream, LinesCodec::new());
    lines
        .send(format!("* welcome, {name}. /nick NAME, /quit"))
        .await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    {
        let mut state = state.lock().await;
        state.peers.insert(addr, tx);
        state.broadcast(Some(addr), &format!("* {name} joined"));
    }
    loop {
        tokio::select! {
            Some(msg) = rx.recv() => lines.send(&msg).await?,
            result = lines.next() => match result {
                Some(Ok(msg)) => {
                    if let Some(new) = msg.strip_prefix("/nick ") {
                        let notice = format!("* {name} is now {new}");
                        name = new.trim().to_string();
                        state.lock().await.broadcast(None, &notice);
                    } else if msg.trim() == "/quit" {
                        break;
                    } else {
                        state.lock().await.broadcast(Some(addr), &format!("{name}: {msg}"));
                    }
                }
                Some(Err(_)) | None => break,
            },
        }
    }
    let mut state = state.lock().await;
    state.peers.remove(&addr);
    state.broadcast(Some(addr), &format!("* {name} left"));
    Ok(())
}
