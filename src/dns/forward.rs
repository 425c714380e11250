//! Forwarding of a raw query to the upstream resolvers, relaying their raw answer.
//!
//! The query bytes go out unchanged except for the ID, which is replaced by a fresh random
//! one per try (together with the kernel's random source port it makes a forged answer hard
//! to slip in); the answer bytes come back unchanged except for the ID, which becomes the
//! client's again. EDNS options, TC and everything else pass through untouched.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::resolv::Upstreams;

const RCODE_SERVFAIL: u8 = 2;
const RCODE_REFUSED: u8 = 5;

fn random_id() -> u16 {
    let mut b = [0u8; 2];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == 2 {
        u16::from_ne_bytes(b)
    } else {
        // getrandom cannot really fail for 2 bytes after boot; the time is a fallback.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u16)
            .unwrap_or(0)
    }
}

/// Forwards `query` (a full DNS message, at least a 12-byte header) to the upstreams in
/// order, each with the configured timeout, over TCP when `tcp`. Returns the answer with
/// the client's ID, or None when no upstream gave one (the caller answers SERVFAIL).
pub async fn forward(query: &[u8], ups: &Upstreams, tcp: bool, network: &str) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let client_id = [query[0], query[1]];
    let mut out = query.to_vec();
    // A SERVFAIL or REFUSED answer is kept but the next server is tried, as glibc does:
    // one broken upstream should not break names the next one would resolve.
    let mut fallback = None;
    for _ in 0..ups.attempts {
        for &server in &ups.servers {
            let id = random_id();
            out[..2].copy_from_slice(&id.to_be_bytes());
            let exchange = async {
                if tcp {
                    tcp_exchange(server, &out, id).await
                } else {
                    udp_exchange(server, &out, id).await
                }
            };
            match tokio::time::timeout(ups.timeout, exchange).await {
                Ok(Ok(mut answer)) => {
                    answer[..2].copy_from_slice(&client_id);
                    let rcode = answer[3] & 0x0f;
                    if rcode == RCODE_SERVFAIL || rcode == RCODE_REFUSED {
                        tracing::debug!(network, %server, rcode, "upstream refused or failed, trying the next");
                        fallback = Some(answer);
                        continue;
                    }
                    return Some(answer);
                }
                Ok(Err(e)) => tracing::debug!(network, %server, tcp, "upstream DNS error: {e}"),
                Err(_) => tracing::debug!(network, %server, tcp, "upstream DNS timed out"),
            }
        }
    }
    fallback
}

/// True when `answer` is a response carrying our `id`.
fn is_answer_to(answer: &[u8], id: u16) -> bool {
    answer.len() >= 12 && u16::from_be_bytes([answer[0], answer[1]]) == id && answer[2] & 0x80 != 0
}

async fn udp_exchange(server: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await?;
    // Connected: the kernel drops datagrams from anyone else, and an ICMP port unreachable
    // shows up as ECONNREFUSED at once instead of a timeout.
    sock.connect(server).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        if is_answer_to(&buf[..n], id) {
            buf.truncate(n);
            return Ok(buf);
        }
        // A late answer to an earlier try or junk: keep waiting within the timeout.
    }
}

async fn tcp_exchange(server: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(server).await?;
    let len = u16::try_from(query.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "query too long"))?;
    let mut msg = Vec::with_capacity(query.len() + 2);
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(query);
    stream.write_all(&msg).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut buf).await?;
    if !is_answer_to(&buf, id) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "upstream answered with a different ID",
        ));
    }
    Ok(buf)
}
