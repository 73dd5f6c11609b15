//! Copying between a TCP socket and an HTTP/2 stream, both ways at once. TCP EOF becomes an
//! empty DATA frame with END_STREAM; END_STREAM from the peer becomes a TCP write shutdown, so
//! half-close crosses the tunnel. DATA is sent only within the peer's flow-control window and
//! received capacity is released as bytes are written out.

use std::io;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::COPY_BUFFER;

/// Copies until both directions end; returns (bytes TCP to HTTP/2, bytes HTTP/2 to TCP).
pub async fn copy(
    tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
) -> io::Result<(u64, u64)> {
    let (mut rd, mut wr) = tcp.into_split();
    let up = async {
        let mut buf = BytesMut::with_capacity(COPY_BUFFER);
        let mut total = 0u64;
        loop {
            if buf.capacity() - buf.len() < COPY_BUFFER / 4 {
                buf.reserve(COPY_BUFFER);
            }
            let n = rd.read_buf(&mut buf).await?;
            if n == 0 {
                send.send_data(Bytes::new(), true).map_err(h2_io)?;
                return Ok::<_, io::Error>(total);
            }
            total += n as u64;
            let mut chunk = buf.split().freeze();
            while !chunk.is_empty() {
                send.reserve_capacity(chunk.len());
                let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
                    .await
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed by the peer")
                    })?
                    .map_err(h2_io)?;
                let part = chunk.split_to(granted.min(chunk.len()));
                send.send_data(part, false).map_err(h2_io)?;
            }
        }
    };
    let down = async {
        let mut total = 0u64;
        while let Some(data) = recv.data().await {
            let data = data.map_err(h2_io)?;
            let n = data.len();
            wr.write_all(&data).await?;
            total += n as u64;
            recv.flow_control().release_capacity(n).map_err(h2_io)?;
        }
        wr.shutdown().await?;
        Ok::<_, io::Error>(total)
    };
    tokio::try_join!(up, down)
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::other(e)
    }
}
