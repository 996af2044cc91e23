#!/usr/bin/perl
# The fake Kubernetes API server the tests use, judged by the real client: kubectl lists
# Ingresses from it (`get ingress -A -o json`), follows its watch (`get ingress -A --watch`),
# and runs `kubectl proxy` in front of it; the edge then routes through that proxy, as an
# operator's edge does with `kubectl proxy` or Rancher's API.

use strict;
use warnings;
use Test::More;
use JSON::PP;
use POSIX qw(WNOHANG);
use Edge::Test qw(http_get wait_for);
use Edge::FakeKube;

my $t = Edge::Test->new;
my $dir = $t->dir;
my $kube = Edge::FakeKube->new($t, 'a');
$kube->apply(Edge::FakeKube::ingress('web', 'shop', hosts => ['shop.test'], ip => '10.0.0.5'));
$kube->apply(Edge::FakeKube::ingress('ops', 'grafana', hosts => ['grafana.test']));
$kube->start;
my $port = $kube->port;
$kube->kubeconfig;

my $list = `kubectl get ingress -A -o json 2>&1`;
is($?, 0, 'kubectl get ingress -A -o json succeeds') or diag $list;
my $items = eval { decode_json($list)->{items} } // [];
is_deeply([sort map { "$_->{metadata}{namespace}/$_->{metadata}{name}" } @$items],
    ['ops/grafana', 'web/shop'], 'it lists both Ingresses');
my ($shop) = grep { $_->{metadata}{name} eq 'shop' } @$items;
is($shop && $shop->{spec}{rules}[0]{host}, 'shop.test', 'with their hosts');

# kubectl follows the watch: a new Ingress shows in its output.
my $pid = fork() // die;
if ($pid == 0) {
    open STDOUT, '>', "$dir/watch.out";
    open STDERR, '>&', \*STDOUT;
    exec 'kubectl', 'get', 'ingress', '-A', '--watch';
    exit 127;
}
wait_for(sub { $t->read_file('watch.out') =~ /grafana/ }, 'kubectl lists before it watches');
$kube->apply(Edge::FakeKube::ingress('web', 'blog', hosts => ['blog.test']));
wait_for(sub { $t->read_file('watch.out') =~ /\bblog\b/ }, 'kubectl sees the new Ingress');
pass('kubectl get --watch follows the watch');
ok(grep({ $_->[1] =~ /watch=(1|true)/ } @{$kube->requests}), 'through a watch request');
kill 'TERM', $pid;
waitpid($pid, 0);

# kubectl proxy in front of the fake; the edge reads one namespace through it.
my $proxy_port = $t->port('proxy');
my $proxy = fork() // die;
if ($proxy == 0) {
    open STDOUT, '>', "$dir/proxy.out";
    open STDERR, '>&', \*STDOUT;
    exec 'kubectl', 'proxy', "--port=$proxy_port", '--address=127.0.0.1';
    exit 127;
}
wait_for(sub { $t->read_file('proxy.out') =~ /Starting to serve/ }, 'kubectl proxy serves');

$t->write_routes('routes.json', <<'EOF2');
{"upstreams": {"cluster-b": {"servers": ["127.0.0.1:%%PORT_b%%"]}}}
EOF2
$t->config(<<"EOF2");
    edge_routes %%TESTDIR%%/routes.json;
    edge_routes_url http://127.0.0.1:$proxy_port/apis/networking.k8s.io/v1/namespaces/web/ingresses
                    name=cluster-b format=k8s upstream=cluster-b interval=1s;
    edge_state %%TESTDIR%%/state;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_b%%; return "b"; }
EOF2
$t->run;
my $edge = $t->port('edge');
wait_for(sub { http_get($edge, 'shop.test') eq 'b' }, 'shop.test through kubectl proxy');
pass('the edge routes a host read through kubectl proxy');
is(http_get($edge, 'grafana.test'), '', 'another namespace is not read');
$kube->apply(Edge::FakeKube::ingress('web', 'new', hosts => ['new.test']));
wait_for(sub { http_get($edge, 'new.test') eq 'b' }, 'a new Ingress through the proxied watch');
pass("a new Ingress routes through the proxy's watch");
ok(grep({ $_->[1] =~ m{/namespaces/web/ingresses\?.*watch=1} } @{$kube->requests}),
    'the edge watched through the proxy');

kill 'TERM', $proxy;
waitpid($proxy, 0);
unlike($t->read_file('error.log'), qr/\[(alert|crit|emerg)\]/, 'no alerts in error.log');
done_testing;
