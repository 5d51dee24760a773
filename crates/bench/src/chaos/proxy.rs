//! A TCP proxy on loopback between the producer and Redis that can lose the network: stall
//! every connection (a partition that heals: bytes wait, as TCP retransmits them, and flow
//! once it is over) or cut every connection and refuse new ones (a partition that resets).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Up,
    /// Nothing moves in either direction; connections stay open.
    Stalled,
    /// Every connection is closed and new ones are closed at once.
    Down,
}

pub struct FaultProxy {
    port: u16,
    link: watch::Sender<Link>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:target`.
    pub async fn start(target: u16) -> anyhow::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (link, rx) = watch::channel(Link::Up);
        let target: SocketAddr = ([127, 0, 0, 1], target).into();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *rx.borrow() == Link::Down {
                    continue;
                }
                tokio::spawn(forward(client, target, rx.clone()));
            }
        });
        Ok(FaultProxy { port, link })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn set(&self, link: Link) {
        let _ = self.link.send(link);
    }
}

async fn forward(client: TcpStream, target: SocketAddr, link: watch::Receiver<Link>) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    // Either direction ending (EOF, error, the link going down) closes both: Redis clients
    // hold one long-lived connection and reconnect.
    tokio::select! {
        _ = pump(cr, sw, link.clone()) => {}
        _ = pump(sr, cw, link) => {}
    }
}

/// Copies until EOF or the link goes down; while it is stalled, neither reads nor writes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut link: watch::Receiver<Link>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !passable(&mut link).await {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = link.wait_for(|l| *l != Link::Up) => continue,
        };
        // Bytes read just before a stall wait for it to end, as they would in flight.
        if !passable(&mut link).await {
            return;
        }
        tokio::select! {
            r = to.write_all(&buf[..n]) => if r.is_err() { return },
            _ = link.wait_for(|l| *l == Link::Down) => return,
        }
    }
}

/// Waits while the link is stalled; false once it is down.
async fn passable(link: &mut watch::Receiver<Link>) -> bool {
    match link.wait_for(|l| *l != Link::Stalled).await {
        Ok(l) => *l == Link::Up,
        Err(_) => false,
    }
}
