//! The agent fed from the Kubernetes API: the in-repo fake apiserver runs in the test
//! process with its socket in the node namespace, the real agent watches it through a
//! kubeconfig, and Services created through the fake carry real traffic.
//!
//! Run as root: `cargo xtask test` (or `cargo test --release -p tests --test kube`).
use std::{
    io::{self, BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use fake_apiserver::FakeApiServer;
use serde_json::{Value, json};
use tests::{
    agent::Agent,
    require_root,
    servers::{self, Server},
    topology::{Host, Topology},
    wait_until,
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TIMEOUT: Duration = Duration::from_secs(3);

/// Fields drop in declaration order: agent first, then the apiserver and its runtime,
/// then servers and namespaces.
struct Env {
    agent: Agent,
    api: FakeApiServer,
    _runtime: tokio::runtime::Runtime,
    _servers: Vec<Server>,
    topo: Topology,
}

/// One client, three pods serving TCP on 8080, the fake apiserver listening on the node's
/// loopback, and an agent watching it (ready once the empty initial lists are applied).
fn env() -> Env {
    require_root();
    let topo = Topology::new(1, 3);
    let servers = (1..=3)
        .map(|i| servers::tcp(&topo.pods[i - 1].ns, &format!("pod-{i}"), 8080))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = topo
        .node
        .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the fake apiserver in the node namespace");
    let api = {
        let _entered = runtime.enter();
        FakeApiServer::from_listener(listener).expect("fake apiserver")
    };
    let agent = Agent::start_with_kubeconfig(&topo.node, &api.kubeconfig());
    Env {
        agent,
        api,
        _runtime: runtime,
        _servers: servers,
        topo,
    }
}

fn service() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": "web", "namespace": "default" },
        "spec": {
            "clusterIP": CLUSTER_IP.to_string(),
            "clusterIPs": [CLUSTER_IP.to_string()],
            "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080 }],
        },
    })
}

fn slice(pods: &[&Host]) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|p| json!({ "addresses": [p.ip.to_string()], "conditions": { "ready": true } }))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-1",
            "namespace": "default",
            "labels": { "kubernetes.io/service-name": "web" },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
    })
}

/// Connects from `client` and returns the name of the pod that greets.
fn hello(client: &Host, addr: Ipv4Addr, port: u16) -> io::Result<String> {
    client.ns.run(move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from((addr, port)), TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut line = String::new();
        BufReader::new(&mut s).read_line(&mut line)?;
        Ok(line
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned())
    })
}

#[test]
fn service_created_through_the_api_carries_traffic() {
    let env = env();
    let client = &env.topo.clients[0];
    env.api.upsert(service()).expect("create the Service");
    env.api
        .upsert(slice(&[&env.topo.pods[0]]))
        .expect("create the EndpointSlice");
    wait_until(
        "traffic to pod-1 through the ClusterIP",
        Duration::from_secs(1),
        || hello(client, CLUSTER_IP, 80).is_ok_and(|pod| pod == "pod-1"),
    );

    // A change to the slice moves new connections.
    env.api
        .upsert(slice(&[&env.topo.pods[1]]))
        .expect("update the EndpointSlice");
    wait_until(
        "traffic to pod-2 after the update",
        Duration::from_secs(1),
        || hello(client, CLUSTER_IP, 80).is_ok_and(|pod| pod == "pod-2"),
    );

    // Deleting the Service removes the frontend: connections are refused.
    assert!(env.api.delete("Service", "default", "web"));
    wait_until(
        "the ClusterIP to be refused",
        Duration::from_secs(1),
        || hello(client, CLUSTER_IP, 80).is_err(),
    );
    assert!(
        env.agent.log().contains("lb-agent ready"),
        "{}",
        env.agent.log()
    );
}
