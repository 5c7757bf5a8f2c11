//! The io_uring engine alone, on loopback, for benches and tests: a NodePort
//! snapshot to one backend, and the engine serving it on a thread of its own.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::SeedableRng;
use socket2::{Domain, Socket, Type};

use super::builders::{node, port, service, slice, slice_port, snapshot};
use crate::config::DataPlaneOptions;
use crate::dataplane::engine::{drive, Sizes, Tcp};
use crate::dataplane::Shared;
use crate::model::{Object, Protocol, ServicePort, ServiceType};
use crate::state::Snapshot;

/// NodePort Service `default/np` on `node_addr`:`node_port` (ClusterIP
/// 10.96.0.99:80), its one endpoint `backend`.
pub fn nodeport_snapshot(node_addr: IpAddr, node_port: u16, backend: SocketAddr) -> Snapshot {
    nodeport_snapshot_of(Protocol::Tcp, node_addr, node_port, backend)
}

/// [`nodeport_snapshot`] for `proto`.
pub fn nodeport_snapshot_of(
    proto: Protocol,
    node_addr: IpAddr,
    node_port: u16,
    backend: SocketAddr,
) -> Snapshot {
    let svc = crate::model::Service {
        service_type: ServiceType::NodePort,
        ..service(
            "default",
            "np",
            &["10.96.0.99"],
            vec![ServicePort {
                node_port: Some(node_port),
                ..port("", proto, 80, backend.port())
            }],
        )
    };
    let eps = slice(
        "default",
        "np-1",
        "np",
        vec![slice_port("", proto, backend.port())],
        vec![super::builders::endpoint(&backend.ip().to_string())],
    );
    let a = node_addr.to_string();
    snapshot(
        vec![Object::Service(svc), Object::EndpointSlice(eps)],
        &node("n", &[&a], &[&a]),
    )
}

/// A listening TCP socket on 127.0.0.1, any port, as the engine takes it.
pub fn loopback_listener() -> (OwnedFd, SocketAddr) {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    s.listen(1024).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    (OwnedFd::from(s), addr)
}

/// A bound UDP socket on 127.0.0.1, any port, as the engine takes it.
pub fn loopback_udp() -> (OwnedFd, SocketAddr) {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    (OwnedFd::from(s), addr)
}

/// Shared state serving [`nodeport_snapshot`] for `front` → `backend`.
pub fn shared_for(front: SocketAddr, backend: SocketAddr) -> Arc<Shared> {
    shared_for_proto(Protocol::Tcp, front, backend)
}

/// [`shared_for`] with a Service of `proto`.
pub fn shared_for_proto(proto: Protocol, front: SocketAddr, backend: SocketAddr) -> Arc<Shared> {
    let shared = Shared::new(DataPlaneOptions::default());
    shared.snapshot.store(Arc::new(nodeport_snapshot_of(
        proto,
        front.ip(),
        front.port(),
        backend,
    )));
    shared
}

/// The engine proxying a loopback NodePort to `backend` on its own thread
/// (its own tokio-uring runtime), until dropped.
pub struct Proxy {
    /// Where clients connect.
    pub front: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Starts proxying to `backend` with the engine's default sizes.
    pub fn start(backend: SocketAddr) -> Self {
        Self::start_of(Protocol::Tcp, backend)
    }

    /// Starts proxying `proto` to `backend` with the engine's default sizes.
    pub fn start_of(proto: Protocol, backend: SocketAddr) -> Self {
        let (fd, front) = match proto {
            Protocol::Tcp => loopback_listener(),
            Protocol::Udp => loopback_udp(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            tokio_uring::start(async move {
                let shared = shared_for_proto(proto, front, backend);
                let rng = std::rc::Rc::new(std::cell::RefCell::new(SmallRng::seed_from_u64(1)));
                let engine = Tcp::new(shared, rng, Sizes::default()).unwrap();
                let engine = std::rc::Rc::new(std::cell::RefCell::new(engine));
                match proto {
                    Protocol::Tcp => {
                        engine.borrow_mut().listen(fd, front);
                    }
                    Protocol::Udp => {
                        engine.borrow_mut().listen_udp(fd, front);
                    }
                }
                tokio::select! {
                    r = drive(engine) => r.unwrap(),
                    _ = stopped => {}
                }
            })
        });
        Self {
            front,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
