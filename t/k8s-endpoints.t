#!/usr/bin/perl
# Servers from a Service's endpoints (`discover=nodes,endpoints`, `"discover": {"service":
# ...}`), as the seed's RKE2 runs its ingress controller: a DaemonSet on hostPort, whose
# EndpointSlices name the node each pod runs on. By node address, only the nodes with a pod of
# the Service take connections (not every node, as tools that send to all nodes do); by pod
# address, the pods. A terminating pod still serving drains its node or itself; a pod that is
# not ready takes none; a pod added on another node brings it in. kubectl lists the slices
# from the fake API server. nginx -t refuses a node-address upstream on a source that does
# not read nodes.

use strict;
use warnings;
use Test::More;
use JSON::PP;
use IO::Socket::INET;
use Time::HiRes qw(time);
use Edge::Test qw(echo_serves wait_for);
use Edge::FakeKube;

plan skip_all => 'kubectl is not installed' unless system('kubectl version --client >/dev/null 2>&1') == 0;

my $t = Edge::Test->new;
my $dir = $t->dir;
my $edge = $t->port('edge');
# Nodes a1-a3, and pods p1 (on a1), p2 (on a2), p3 (on a3, later).
my %ip = (a1 => '127.0.0.2', a2 => '127.0.0.3', a3 => '127.0.0.4',
    p1 => '127.0.0.7', p2 => '127.0.0.8', p3 => '127.0.0.9');
my $kube = Edge::FakeKube->new($t, 'a');
$kube->apply(Edge::FakeKube::node($_, $ip{$_})) for qw(a1 a2 a3);
my $service = 'rke2-ingress-nginx-controller';
my $slice = sub { Edge::FakeKube::endpointslice('kube-system', "$service-x7k2p", $service, @_) };
$kube->apply($slice->([$ip{p1}, 'a1', ready => 'true'], [$ip{p2}, 'a2']));
# Another Service's pod on a3: not the ingress controller's.
$kube->apply(Edge::FakeKube::endpointslice('web', 'shop-9f8d', 'shop', [$ip{p3}, 'a3', ready => 'true']));
$kube->start;
$t->backend($_, addr => $ip{$_}, port => $edge, mode => 'echo') for sort keys %ip;

$kube->kubeconfig;

$t->write_routes('routes.json', <<"EOF");
{"upstreams": {
   "by-node": {"discover": {"source": "cluster-a", "service": "kube-system/$service", "address": "node"}},
   "by-pod":  {"discover": {"source": "cluster-a", "service": "kube-system/$service"}}},
 "routes": {"node.test": "by-node", "pod.test": "by-pod"}}
EOF
my $url = $kube->url;
$t->config(<<"EOF", workers => 2);
    edge_routes %%TESTDIR%%/routes.json;
    edge_routes_url $url name=cluster-a format=k8s discover=nodes,endpoints;
    edge_state %%TESTDIR%%/state;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
EOF
$t->run;

my $serves = sub { my ($host, @rest) = @_; echo_serves($edge, $host, @rest) };

$serves->('node.test', 'a1,a2', "by node: the nodes with a pod of the Service, not a3");
$serves->('pod.test', 'p1,p2', 'by pod: the pods');
my $slices = decode_json(`kubectl get endpointslices -A -o json 2>&1` || '{}')->{items} // [];
is_deeply([sort map { "$_->{metadata}{namespace}/$_->{metadata}{name}" } @$slices],
    ["kube-system/$service-x7k2p", 'web/shop-9f8d'], 'kubectl get endpointslices -A lists the slices');

# The pod on a2 terminating, still serving (a rolling update): a2 and p2 drain.
$kube->apply($slice->([$ip{p1}, 'a1'], [$ip{p2}, 'a2', ready => 'false', serving => 'true', terminating => 'true']));
$serves->('node.test', 'a1', 'a node whose pod is terminating takes no new connection');
$serves->('pod.test', 'p1', 'nor does the terminating pod');
wait_for(sub { ((Edge::Test::server_state($t->port('status'), 'by-pod', $ip{p2}) // {})->{state} // '') eq 'draining' },
    'status to show p2 draining');
pass('which status shows draining');

# A new pod on a3, not ready yet, then ready.
$kube->apply($slice->([$ip{p1}, 'a1'], [$ip{p3}, 'a3', ready => 'false']));
$serves->('node.test', 'a1', 'a pod not ready brings no node');
$kube->apply($slice->([$ip{p1}, 'a1'], [$ip{p3}, 'a3', ready => 'true']));
$serves->('node.test', 'a1,a3', 'once ready, its node takes connections');
$serves->('pod.test', 'p1,p3', 'and the pod');

# The node of a pod cordoned: by node it drains, by pod the pod still takes connections.
$kube->apply(Edge::FakeKube::node('a3', $ip{a3}, unschedulable => 1));
$serves->('node.test', 'a1', 'the node of a pod cordoned drains');
$serves->('pod.test', 'p1,p3', 'its pod, by pod address, does not');

my @alerts = grep { /\[(alert|crit|emerg)\]/ } split /\n/, $t->read_file('error.log');
is_deeply(\@alerts, [], 'no alert in error.log');
$t->stop;

# nginx -t: by node address on a source that reads endpoints only.
my $u = Edge::Test->new;
$u->write_routes('routes.json', qq({"upstreams": {"i": {"discover": {"source": "cluster-a", "service": "kube-system/$service", "address": "node"}}}, "routes": {"x.test": "i"}}));
$u->config(<<"EOF");
    edge_routes %%TESTDIR%%/routes.json;
    edge_routes_url $url name=cluster-a format=k8s discover=endpoints;
    edge_state %%TESTDIR%%/state;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass \$edge_upstream; }
EOF
my ($ok, $out) = $u->test_config;
ok(!$ok, 'nginx -t refuses a node-address upstream on a source without discover=nodes');
like($out, qr/no edge_routes_url name=cluster-a with discover=nodes,endpoints/, 'and says what it needs') or diag $out;
done_testing;
