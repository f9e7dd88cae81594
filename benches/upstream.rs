//! One exchange with a plain-HTTP upstream on a kept connection, as a lane does it: the
//! request driving its connection itself (`Connections`) against the connection running as a
//! task of its own (hyper's `http1::Connection` spawned, as `Connections` did before), for a
//! whole chat answer and for a stream of 21 chunks. The upstream is a loopback socket that
//! answers every request with fixed bytes; the figure is the whole round trip, its kernel
//! share included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::http::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate::upstream::Connections;

const ANSWER: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"The quick brown fox jumps over the lazy dog."},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":10,"total_tokens":19}}"#;

/// The bytes answering one request: a whole JSON answer, or 21 chunks of a stream.
fn answer(streamed: bool) -> Vec<u8> {
    if !streamed {
        return format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{ANSWER}",
            ANSWER.len()
        )
        .into_bytes();
    }
    let mut out =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    for n in 0..21 {
        let event =
            format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"word{n} \"}}}}]}}\n\n");
        out.extend_from_slice(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes());
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// A loopback upstream that answers each request (read as far as its blank line and its
/// short body) with `bytes`. Returns its port.
async fn upstream(bytes: Vec<u8>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let bytes: Arc<[u8]> = bytes.into();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            socket.set_nodelay(true).unwrap();
            let bytes = bytes.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 4096];
                loop {
                    // Each request is small and arrives in one read: header and a short body.
                    match socket.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => socket.write_all(&bytes).await.unwrap(),
                    }
                }
            });
        }
    });
    port
}

fn request(uri: &Uri) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(Bytes::from_static(br#"{"model":"m"}"#)));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri.clone();
    request
}

fn bench_exchange(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("upstream_exchange");
    for (streamed, name) in [(false, "chat"), (true, "stream_21_chunks")] {
        let port = runtime.block_on(upstream(answer(streamed)));
        let uri: Uri = format!("http://127.0.0.1:{port}/v1/chat/completions")
            .parse()
            .unwrap();
        let connections = Arc::new(Connections::for_uri(&uri, Duration::from_secs(1)).unwrap());
        group.bench_function(format!("{name}/driven_by_the_request"), |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let reply = connections.send(request(&uri)).await.unwrap();
                    reply.into_body().collect().await.unwrap().to_bytes()
                })
            })
        });
        let path: Uri = "/v1/chat/completions".parse().unwrap();
        let mut sender = runtime.block_on(async {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            stream.set_nodelay(true).unwrap();
            let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.unwrap();
            tokio::spawn(connection);
            sender
        });
        group.bench_function(format!("{name}/connection_task"), |b| {
            b.iter(|| {
                runtime.block_on(async {
                    sender.ready().await.unwrap();
                    let reply = sender.send_request(request(&path)).await.unwrap();
                    reply.into_body().collect().await.unwrap().to_bytes()
                })
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(3));
    targets = bench_exchange
}
criterion_main!(benches);
