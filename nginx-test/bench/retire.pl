# The measurement behind nginx-test/bench/retire.
use strict;
use warnings;
use IO::Socket::INET;
use POSIX ();
use Time::HiRes qw(time sleep);
use Edge::Test qw(http_request wait_for);

my ($rounds, $baseline) = @ARGV;
my $held = 1000;
our $routes;

sub table {
    my ($version) = @_;
    my $r = join ",\n", map { qq{  "n$_.retire.test": "h"} } 0 .. $routes - 2;
    return qq({"upstreams": {"h": {"servers": ["127.0.0.1:%%PORT_h%%"]}},\n "routes": {\n$r,\n  "v$version.retire.test": "h"\n }}\n);
}

sub round {
    my ($module) = @_;
    local $ENV{TEST_NGINX_MODULE} = $module;
    my $t = Edge::Test->new;
    $t->write_routes('routes.json', table(0));
    $t->backend('h', mode => 'hold');
    $t->config(<<'CONF', connections => 4096);
    edge_routes %%TESTDIR%%/routes.json interval=100ms;
    server { listen 127.0.0.1:%%PORT_edge%% backlog=4096; edge_route http; proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_ping%%; return "p"; }
CONF
    my $conf = $t->read_file('nginx.conf');
    $conf =~ s/access_log \S+ edge;/access_log off;/;
    $t->write_file('nginx.conf', $conf);
    $t->run;
    my ($edge, $ping) = ($t->port('edge'), $t->port('ping'));
    my @conns;
    for (1 .. $held) {
        my $c = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$edge", Timeout => 10) or die "connect: $!\n";
        syswrite($c, http_request('n7.retire.test'));
        push @conns, $c;
    }
    for my $c (@conns) { sysread($c, my $b, 1) or die "no answer\n" }
    # The swap: every held session keeps the old table.
    $t->write_routes('routes.json', table(1));
    $t->wait_for_log(qr/table 2 in service/);
    # The prober, in a child, for 3 s; the held connections close after 1 s.
    my $file = $t->dir . '/probe.txt';
    my $pid = fork() // die;
    if ($pid == 0) {
        # The held connections are the parent's to close.
        close $_ for @conns;
        open my $out, '>', $file or die;
        my $end = time + 3;
        while (time < $end) {
            my $start = time;
            my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$ping", Timeout => 5) or next;
            sysread($s, my $b, 1);
            printf {$out} "%.6f %.3f\n", $start, (time - $start) * 1000;
            close $s;
            sleep 0.002;
        }
        close $out;
        POSIX::_exit(0);
    }
    sleep 1;
    my $closed_at = time;
    close $_ for @conns;
    waitpid($pid, 0);
    my @lat = map { [split] } split /\n/, $t->read_file('probe.txt');
    my @before = sort { $a <=> $b } map { $_->[1] } grep { $_->[0] < $closed_at } @lat;
    my @after = sort { $a <=> $b } map { $_->[1] } grep { $_->[0] >= $closed_at } @lat;
    my $freed = $t->read_file('error.log') =~ /table 1 is no longer used, freed off the event loop/ ? 'thread' : 'loop';
    $t->stop;
    return ($before[-1] // 0, $after[$#after / 2] // 0, $after[-1] // 0, scalar @after, $freed);
}

my @builds = (['nginx-edge (this tree)', $ENV{TEST_NGINX_MODULE}]);
push @builds, ['baseline', $baseline] if $baseline;
printf "%d sessions held across a swap, then closed; a probe's connect-to-first-byte, ms\n\n", $held;
printf "| %-24s | %9s | %5s | %-10s | %-9s | %-9s | %-15s |\n", 'build', 'routes', 'round', 'max before', 'p50 after', 'max after', 'old table freed';
printf "|%s|\n", join '|', map { '-' x ($_ + 2) } 24, 9, 5, 10, 9, 9, 15;
for $routes (split /,/, $ENV{RETIRE_SIZES} // '100000,1000000') {
    for my $round (1 .. $rounds) {
        for my $b (@builds) {
            my ($before, $p50, $max, $n, $freed) = round($b->[1]);
            printf "| %-24s | %9d | %5d | %10.2f | %9.2f | %9.2f | %-15s |\n", $b->[0], $routes, $round, $before, $p50, $max, "on the $freed";
        }
    }
}
