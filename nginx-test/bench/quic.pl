#!/usr/bin/perl
# See nginx-test/bench/quic.
use strict;
use warnings;
use POSIX ();
use Time::HiRes qw(time);
use Edge::Test;

$| = 1;

my $n = shift // 1000;
my $python = Edge::Test::quic_python() or die "no aioquic: run nginx-test/prereqs\n";
my $peer = Edge::Test::quic_peer_script();
my $t = Edge::Test->new;
my ($crt, $key) = $t->certificate('backend');

$t->quic_peer('server', $t->port('back'), 'x', $crt, $key);

$t->write_routes('routes.json', <<"EOF2");
{"upstreams": {"a": {"servers": ["127.0.0.1:${\$t->port('back')}"]}}, "routes": {"a.test": "a"}}
EOF2
$t->config(<<'EOF2');
    edge_routes %%TESTDIR%%/routes.json;
    server { listen 127.0.0.1:%%PORT_edge%% udp reuseport; edge_route quic; proxy_pass nginx_edge;
             proxy_timeout 1s; access_log off; }
    server { listen 127.0.0.1:%%PORT_plain%% udp reuseport; proxy_pass 127.0.0.1:%%PORT_back%%;
             proxy_timeout 1s; access_log off; }
EOF2
$t->run;
my ($worker) = Edge::Test::wait_for(sub { ($t->read_file('error.log') =~ /start worker process (\d+)/)[0] }, 'the worker');

sub cpu_ms {
    open my $f, '<', "/proc/$worker/stat" or die "no worker: $!\n";
    my @f = split ' ', (<$f> =~ s/^.*\) //r);
    return ($f[11] + $f[12]) * 1000 / POSIX::sysconf(POSIX::_SC_CLK_TCK());
}

sub run {
    my ($port) = @_;
    my ($cpu, $t0) = (cpu_ms(), time);
    my $out = `$python $peer get $port a.test --count $n`;
    my $wall = time - $t0;
    my $ok = () = $out =~ /^x$/mg;
    return ($ok, $n / $wall, (cpu_ms() - $cpu) * 1000 / $n);
}

printf "%-32s %8s %14s %22s\n", 'path', 'answered', 'connections/s', 'worker CPU per conn.';
for my $case (['straight to the server', $t->port('back')], ['nginx udp proxy_pass', $t->port('plain')],
    ['nginx-edge (edge_route quic)', $t->port('edge')])
{
    my ($ok, $rate, $cpu) = run($case->[1]);
    printf "%-32s %8d %14.0f %19.0f us\n", $case->[0], $ok, $rate, $case->[1] == $t->port('back') ? 0 : $cpu;
}
